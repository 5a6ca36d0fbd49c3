"""No request can hurt the server or another request, on a live Serve app (`single`: what is
under test is the HTTP side, the same for every layout; the shipped `disaggregated` layout
serves the shared app's tests and the fault, scaling and surviving-stream tests): limits, a
slow prompt that must not stall other clients, streams kept alive while queued, a stream that
runs unharmed through every hostile request of the suite, and property-based fuzzing of both
routes."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.deployments.conftest import API_KEY, deploy, engine_handle, undeploy
from tests.deployments.test_openai import BAD

MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_SEQS = 8


@pytest.fixture(scope="module")
def url(serve_http, tiny_ckpt):
    args = {"model": str(tiny_ckpt), "served_model_name": MODEL, "layout": "single", "max_model_len": 128,
            "kv_cache_blocks": 128, "block_size": 8, "max_num_seqs": MAX_SEQS, "cpus_per_worker": 0.25,
            "api_key": API_KEY, "stream_keepalive_s": 0.5}
    yield deploy(serve_http, "hardened", args)
    undeploy("hardened")


def post(url, path, body, headers=None, timeout=60, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, timeout=timeout,
                      headers=(AUTH if headers is None else headers) | {"Content-Type": "application/json"}, **kw)


def sse_frames(lines) -> list[str]:
    return [line for line in lines if line]


def test_body_over_the_limit_is_413_without_reading_it_all(url):
    big = json.dumps({"model": MODEL, "prompt": "x" * (9 * 1024 * 1024)})
    r = post(url, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the server counts as it reads
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers=AUTH | {"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413


def test_a_huge_prompt_does_not_stall_the_other_clients(url):
    """Tokenising this 4 MB prompt takes seconds; it happens on a worker thread, so the ingress
    keeps answering everyone else meanwhile (before, /health waited for the whole tokenisation)."""
    body = {"model": MODEL, "prompt": "hello world " * 350_000, "max_tokens": 1}
    result = {}
    started = threading.Event()

    def big():
        started.set()
        result["r"] = post(url, "/v1/completions", body, timeout=120)

    t = threading.Thread(target=big)
    start = time.monotonic()
    t.start()
    started.wait()
    time.sleep(0.5)  # the big request is being read and tokenised
    latencies = []
    while t.is_alive() and time.monotonic() - start < 60:
        s = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - s)
        time.sleep(0.1)
    t.join()
    busy = time.monotonic() - start
    assert result["r"].status_code == 400 and result["r"].json()["error"]["param"] == "max_tokens"
    assert busy > 1.5, "the prompt was too quick to tell anything"
    assert latencies and max(latencies) < 0.75, f"/health took up to {max(latencies):.2f}s during {busy:.1f}s"


def vllm_bench_messages(reads) -> list[str]:
    """The messages `vllm bench serve` takes from a stream (its StreamedResponseHandler, vLLM
    0.32): it strips every network read, then splits the joined text on blank lines, or takes
    a buffer that is one whole `data:` JSON. An SSE comment read on its own loses its blank line
    there and is glued to everything after it."""
    buffer, out = "", []
    for read in reads:
        read = read.strip()
        if not read:
            continue
        buffer += read.decode()
        while "\n\n" in buffer:
            message, buffer = buffer.split("\n\n", 1)
            if message.strip():
                out.append(message.strip())
        if buffer.startswith("data: "):
            content = buffer.removeprefix("data: ").strip()
            try:
                whole = content == "[DONE]" or json.loads(content) is not None
            except json.JSONDecodeError:
                whole = False
            if whole:
                out.append(buffer.strip())
                buffer = ""
    return out


def test_a_queued_stream_is_kept_alive_before_its_first_token(url):
    """Every engine slot busy and five rounds of fillers queued: a new stream waits behind them,
    and still gets bytes (keep-alive chunks with no choices) within a few seconds, then its
    tokens, read the way `vllm bench serve` reads them (each network read stripped). The
    fillers stream too, so the test knows the first round runs (each has its first token)
    before it queues the next. Once the keep-alive is in, the fillers still running leave (their
    requests abort), so the test does not wait for them however slow the machine is; and it
    checks that fillers were still running when the keep-alive came, however fast it is."""
    long = {"model": MODEL, "prompt": "busy", "max_tokens": 120, "ignore_eos": True, "stream": True}
    fillers_n = 6 * MAX_SEQS
    admitted = threading.Semaphore(0)
    leave = threading.Event()
    finished_at: list[float] = []  # fillers that ran to their end

    def filler() -> int:
        frames = 0
        with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():  # a queued filler gets keep-alives: it can leave while queued too
                if leave.is_set():
                    return -1
                if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                    frames += 1
                    if frames == 1:
                        admitted.release()
        finished_at.append(time.monotonic())
        return frames

    reads: list[tuple[float, bytes]] = []
    with ThreadPoolExecutor(fillers_n) as pool:
        fillers = [pool.submit(filler) for _ in range(fillers_n)]
        try:
            for _ in range(MAX_SEQS):
                assert admitted.acquire(timeout=60), "a filler never started"
            start = time.monotonic()
            body = {"model": MODEL, "prompt": "queued", "max_tokens": 3, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
                for chunk in r.iter_raw():
                    reads.append((time.monotonic(), chunk))
                    leave.set()
        finally:
            leave.set()
        frames = [f.result() for f in fillers]
    first_seen = reads[0][0]
    assert all(f in (-1, 120) for f in frames), frames
    ended_before = sum(t < first_seen for t in finished_at)
    assert ended_before < fillers_n, "the fillers ended before the keep-alive was due: nothing was queued"
    assert first_seen - start < 3.0
    messages = vllm_bench_messages(chunk for _, chunk in reads)
    assert messages[-1] == "data: [DONE]"
    data = [json.loads(m.removeprefix("data: ")) for m in messages[:-1]]
    beats = [d for d in data if d["choices"] == []]
    tokens = [d for d in data if d["choices"]]
    assert beats and data[0]["choices"] == [], "no keep-alive before the first token"
    assert len(tokens) == 3 and tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert all(d["id"] == data[0]["id"] and d["object"] == "text_completion" for d in data)
    print(f"\n{len(beats)} keep-alive(s), the first after {first_seen - start:.2f}s; "
          f"{ended_before} of {fillers_n} fillers had ended by then")


HOSTILE = [  # (path, body) beyond the suite's BAD list: sizes, shapes and encodings
    ("/v1/completions", "x" * 100),
    ("/v1/completions", b"\xff\xfe\x00garbage"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": 1, "stop_token_ids": [-1000000000]}),
    ("/v1/completions", {"model": MODEL, "prompt": "y" * 200_000, "max_tokens": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": [[1] * 5000], "max_tokens": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 64, "max_tokens": 1, "n": 16}),
    ("/v1/completions", {"model": MODEL, "prompt": "z", "stop": ["z" * 256] * 16, "max_tokens": 20}),
    ("/v1/completions", {"model": MODEL, "prompt": "q", "logit_bias": {str(i): -100 for i in range(300)},
                         "max_tokens": 2}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 1025}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\u0000\ud800"}]}),
    ("/v1/completions", {"model": MODEL, "prompt": "s", "max_tokens": 5, "stream": True, "logprobs": 20,
                         "echo": True}),
]


def _send_everything(url) -> list[int]:
    statuses = []
    for route, body, headers, _, _ in BAD:
        path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[route]
        statuses.append(post(url, path, body, headers).status_code)
    for path, body in HOSTILE:
        statuses.append(post(url, path, body).status_code)
    return statuses


def test_a_stream_runs_unharmed_through_every_hostile_request(url):
    body = {"model": MODEL, "prompt": "The long story", "max_tokens": 100, "ignore_eos": True, "temperature": 0,
            "stream": True}

    def run() -> str:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            frames = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert all("error" not in f for f in frames)
        return "".join(f["choices"][0]["text"] for f in frames)

    alone = run()
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(run)
        attack = pool.submit(_send_everything, url)
        statuses, under_attack = attack.result(), streamed.result()
    assert under_attack == alone
    assert all(s < 500 for s in statuses), statuses


def test_classification_of_failures_never_leaks_internals():
    from deployments.ingress import _classify
    from moe_parallel.contract import InvalidRequest

    internal = _classify(ValueError("tensor shapes [3, 4] and [5] mismatch in sampler.py:88"), "cmpl-1")
    assert internal.status == 500 and "cmpl-1" in internal.message and "sampler" not in internal.message
    client = _classify(InvalidRequest("stop_token_ids: token id -1 is outside", param="stop_token_ids"), "cmpl-2")
    assert (client.status, client.param) == (400, "stop_token_ids")


def test_metrics_need_the_key_and_the_key_check_is_constant_time(url):
    import inspect

    from deployments import ingress

    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).status_code == 200
    assert "hmac.compare_digest" in inspect.getsource(ingress.OpenAIRoutes._auth)


# -- fuzzing -------------------------------------------------------------------------------------

# 300 in the suite (about 14 s); `python -m bench.fuzz` sends 5,000 (`make bench`)
FUZZ_REQUESTS = int(os.environ.get("MOE_SERVE_FUZZ_REQUESTS", "300"))


def _strategies():
    from hypothesis import strategies as st

    json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
    anything = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.text(max_size=8), kids, max_size=3), max_leaves=6)
    small_ids = st.lists(st.integers(-5, 300), min_size=0, max_size=6)
    text = st.text(max_size=40)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                     "content": st.one_of(text, st.none(), anything)})
    fields = {  # each field: mostly plausible values, sometimes anything at all
        "max_tokens": st.one_of(st.integers(1, 4), st.integers(-3, 400)),
        "temperature": st.one_of(st.floats(0, 2), st.floats(-5, 5)), "top_p": st.floats(-0.5, 1.5),
        "top_k": st.integers(-3, 400), "min_p": st.floats(-0.5, 1.5), "n": st.integers(-1, 20),
        "seed": st.integers(-(2**66), 2**66), "stop": st.one_of(text, st.lists(text, max_size=20)),
        "stop_token_ids": small_ids, "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
        "repetition_penalty": st.floats(-1, 25), "min_tokens": st.integers(-2, 8), "ignore_eos": st.booleans(),
        "logprobs": st.one_of(st.integers(-2, 25), st.booleans()), "top_logprobs": st.integers(-2, 25),
        "echo": st.booleans(), "stream": st.booleans(), "logit_bias": st.dictionaries(
            st.one_of(st.integers(-5, 300).map(str), text), st.floats(-150, 150), max_size=4),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
        "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
        "return_tokens_as_token_ids": st.booleans(), "best_of": st.integers(-1, 5), "suffix": text,
        "user": text, "tools": anything, "response_format": anything, "unknown_field": anything,
    }
    prompt = st.one_of(text, st.lists(text, min_size=0, max_size=3), small_ids,
                       st.lists(small_ids, max_size=3), anything)
    completion = st.fixed_dictionaries(
        {"model": st.one_of(st.just(MODEL), st.just(MODEL), text), "prompt": prompt},
        optional={k: v for k, v in fields.items() if k not in ("top_logprobs",)})
    chat = st.fixed_dictionaries(
        {"model": st.one_of(st.just(MODEL), st.just(MODEL), text),
         "messages": st.one_of(st.lists(message, min_size=1, max_size=3), anything)},
        optional={k: v for k, v in fields.items() if k not in ("echo", "suffix", "best_of")})
    body = st.one_of(st.tuples(st.just("/v1/completions"), completion),
                     st.tuples(st.just("/v1/chat/completions"), chat))
    # a few requests drop required fields, send another JSON type, or come without the key
    mangled = st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), anything)
    return st.one_of(_valid(st), _valid(st), body, body, mangled)


def _valid(st):
    """Requests within every documented range: these reach the engine and must come back whole."""
    text = st.text(max_size=30)
    ids = st.lists(st.integers(0, 258), min_size=1, max_size=6)
    common = {
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
        "min_p": st.floats(0, 1), "n": st.integers(1, 3), "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
        "stop_token_ids": st.lists(st.integers(0, 258), max_size=4),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 1), "ignore_eos": st.booleans(),
        "stream": st.booleans(), "logit_bias": st.dictionaries(st.integers(0, 258).map(str), st.floats(-100, 100),
                                                              max_size=4),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
        "return_tokens_as_token_ids": st.booleans(), "user": text,
    }
    completion = st.fixed_dictionaries(
        {"model": st.just(MODEL), "max_tokens": st.integers(1, 4),
         "prompt": st.one_of(text, st.lists(text, min_size=1, max_size=3), ids, st.lists(ids, min_size=1, max_size=3))},
        optional=common | {"logprobs": st.integers(0, 5), "echo": st.booleans()})
    turns = st.sampled_from([["user"], ["user", "assistant", "user"]])
    messages = turns.flatmap(lambda roles: st.tuples(*[st.fixed_dictionaries(
        {"role": st.just(r), "content": text}) for r in roles]).map(list))
    chat = st.fixed_dictionaries({"model": st.just(MODEL), "max_tokens": st.integers(1, 4), "messages": messages},
                                 optional=common | {"logprobs": st.just(True), "top_logprobs": st.integers(0, 5)})
    return st.one_of(st.tuples(st.just("/v1/completions"), completion),
                     st.tuples(st.just("/v1/chat/completions"), chat))


def _check_answer(url: str, path: str, body, with_key: bool) -> int:
    """Send one fuzzed request; return its status after checking the answer's shape."""
    headers = AUTH if with_key else {}
    content = json.dumps(body)
    if isinstance(body, dict) and body.get("stream") is True:
        with httpx.stream("POST", url + path, content=content, timeout=60,
                          headers=headers | {"Content-Type": "application/json"}) as r:
            if r.status_code == 200:
                frames = [x for x in r.iter_lines() if x and not x.startswith(":")]
                assert frames[-1] == "data: [DONE]", frames[-3:]
                for f in frames[:-1]:
                    payload = json.loads(f[6:])
                    assert payload.get("error", {}).get("type") != "internal_server_error", payload
                return 200
            r.read()
            response = r
    else:
        response = httpx.post(url + path, content=content, timeout=60,
                              headers=headers | {"Content-Type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:300], content[:300])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    return response.status_code


def test_fuzzed_requests_never_break_the_server(url):
    """Hypothesis generates the requests (derandomized: the same ones on every run); they go out
    8 at a time while it generates, and every answer is checked."""
    from hypothesis import HealthCheck, Phase, given, settings

    handle = engine_handle("hardened")
    start_blocks = handle.kv_free_blocks.remote().result()
    pool, sent = ThreadPoolExecutor(8), []

    @settings(max_examples=FUZZ_REQUESTS, phases=[Phase.generate], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_strategies())
    def generate(request):
        path, body = request
        sent.append(pool.submit(_check_answer, url, path, body, len(sent) % 17 != 0))  # 1 in 17 without the key

    began = time.monotonic()
    with pool:
        generate()
    seen: dict[int, int] = {}
    for f in sent:
        seen[f.result()] = seen.get(f.result(), 0) + 1
    print(f"\nfuzz: {len(sent)} requests in {time.monotonic() - began:.0f}s, statuses {dict(sorted(seen.items()))}")
    assert len(sent) >= FUZZ_REQUESTS
    assert seen.get(200, 0) > len(sent) // 5 and sum(v for k, v in seen.items() if 400 <= k < 500) > len(sent) // 5
    ok = post(url, "/v1/completions", {"model": MODEL, "prompt": "still fine", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    deadline = time.monotonic() + 30
    while handle.kv_free_blocks.remote().result() != start_blocks and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle.kv_free_blocks.remote().result() == start_blocks


def test_sse_frames_survive_unicode_line_breaks_in_the_text():
    """Found by the fuzzer: the tiny model wrote U+2028 into a completion, and clients that split
    lines like str.splitlines (httpx's iter_lines) cut the raw frame in two."""
    from deployments.openai_format import sse

    text = "a\u2028b\u0085c\u2029d\x1ce"
    frame = sse({"choices": [{"text": text}]})
    lines = [x for x in httpx.Response(200, content=frame.encode()).iter_lines() if x]
    assert len(lines) == 1 and json.loads(lines[0][6:])["choices"][0]["text"] == text
