"""The HTTP route through the official `openai` SDK and raw httpx, on a live Serve app
(disaggregated layout: 1 attention + 2 expert actors), against transformers' greedy output."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.deployments.conftest import API_KEY, SHARED, engine_handle
from tests.reference import reference_model

MODEL = "tiny"


@pytest.fixture(scope="module")
def url(shared_url):
    return shared_url


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def hf_greedy(ckpt, ids: list[int], n: int) -> list[int]:
    model = reference_model(str(ckpt))
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def chat_ids(ckpt, messages) -> list[int]:
    from engine.factory import load_tokenizer

    tok = load_tokenizer(ckpt)
    return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False).input_ids


def text_of(ckpt, ids: list[int]) -> str:
    from engine.factory import load_tokenizer

    return load_tokenizer(ckpt).decode(ids, skip_special_tokens=True)


MESSAGES = [{"role": "user", "content": "Bonjour, ça va?"}]


def test_chat_greedy_equals_transformers(client, tiny_ckpt):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    expected = hf_greedy(tiny_ckpt, chat_ids(tiny_ckpt, MESSAGES), 12)
    assert r.choices[0].message.content == text_of(tiny_ckpt, expected)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids(tiny_ckpt, MESSAGES)) and r.usage.completion_tokens == 12


def test_chat_stream_matches_whole_response(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_prompt_forms_and_greedy(client, tiny_ckpt):
    from engine.factory import load_tokenizer

    ids = load_tokenizer(tiny_ckpt)("Hello").input_ids
    expected = text_of(tiny_ckpt, hf_greedy(tiny_ckpt, ids, 8))
    for prompt, choices in (("Hello", 1), (ids, 1), (["Hello", "Hello"], 2), ([ids, ids], 2)):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == [expected] * choices
        assert [c.index for c in r.choices] == list(range(choices))


def test_completion_stream_echo_n_and_logprobs(client, tiny_ckpt):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, n=2, seed=3, temperature=1.0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and all(c.text.startswith("Hi") for c in r.choices)
    for c in r.choices:  # the prompt's tokens (<s>, H, i; the first without a logprob), then the 5 new ones
        assert len(c.logprobs.tokens) == 3 + 5 and c.logprobs.token_logprobs[0] is None
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs[3:])
        assert c.logprobs.text_offset[:3] == [0, 0, 1] and c.logprobs.text_offset[3] == 2
    assert r.usage.completion_tokens == 10
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, n=2, seed=3, temperature=1.0,
                                           echo=True, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[0], streamed[1]] == [c.text for c in r.choices]  # the same seed gives the same text


def test_chat_logprobs_and_token_ids(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"return_tokens_as_token_ids": True,
                                                                   "ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.token.startswith("token_id:") and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)  # greedy takes the best


def test_stop_string_over_http(client, tiny_ckpt):
    base = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    k = next(i for i in range(1, len(base) - 2) if "\ufffd" not in base[i:i + 2] and base.find(base[i:i + 2]) == i)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[base[k:k + 2]],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[:k] and r.choices[0].finish_reason == "stop"


def sse_events(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_raw_sse_framing(url):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "stream": True, "temperature": 0,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_health_and_metrics(url, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{url}/health").status_code == 200
    client.completions.create(model=MODEL, prompt="x", max_tokens=3)
    time.sleep(2.5)  # replicas push their statistics once a second
    assert httpx.get(f"{url}/metrics").status_code == 401  # behind the key, like every route with data
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_sum", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_perc", "prompt_tokens_total", "generation_tokens_total", "expert_tokens_total"):
        assert f"moe_serve:{name}" in text
    routed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("moe_serve:expert_tokens_total{"))
    generated = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("moe_serve:generation_tokens_total{"))
    assert routed > 0 and generated > 0


def _long_stream(url, max_tokens=200):
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    return httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {API_KEY}"})


def test_disconnect_frees_kv_blocks(url):
    handle = engine_handle(SHARED)
    start = handle.kv_free_blocks.remote().result()
    with _long_stream(url) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        during = handle.kv_free_blocks.remote().result()
    assert during[0] < start[0]  # the request held blocks while it streamed
    deadline = time.monotonic() + 20
    while handle.kv_free_blocks.remote().result() != start and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle.kv_free_blocks.remote().result() == start


BAD = [
    # (route, body or raw string, headers, status, param)
    ("chat", "{not json", None, 400, None),
    ("chat", "[1, 2]", None, 400, None),
    ("chat", {"messages": MESSAGES}, None, 400, "model"),
    ("chat", {"model": "gpt-9", "messages": MESSAGES}, None, 404, "model"),
    ("chat", {"model": MODEL}, None, 400, "messages"),
    ("chat", {"model": MODEL, "messages": []}, None, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages.0.role"),
    ("chat", {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, None, 400, "messages"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "temperature": 3}, None, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, None, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "top_p": 0}, None, 400, "top_p"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "n": 0}, None, 400, "n"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, None, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "max_tokens": 100000}, None, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "top_logprobs": 3}, None, 400, "top_logprobs"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, None, 400,
     "top_logprobs"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "stop": [str(i) for i in range(17)]}, None, 400, "stop"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "stop": "x" * 257}, None, 400, "stop"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "tools": [{"type": "function"}]}, None, 400,
     "tools.0.function"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     None, 400, "tools.0.function.name"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "tool_choice": {"type": "function", "function": {"name": "f"}}},
     None, 400, "tool_choice"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "tool_choice": "required"}, None, 400, "tool_choice"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "response_format": {"type": "xml"}}, None, 400,
     "response_format.type"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_schema"}}, None, 400,
     "response_format"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wizard"}}}}}}, None, 400,
     "response_format"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "structured_outputs": {"regex": "(unclosed"}}, None, 400,
     "structured_outputs"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "structured_outputs": {"regex": "a", "choice": ["b"]}}, None,
     400, "structured_outputs"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "structured_outputs": {"grammar": "start: missing_rule"}},
     None, 400, "structured_outputs"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "bad_words": [""]}, None, 400, "bad_words"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, None, 400,
     "messages.0"),
    ("chat", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, None, 400, "messages.0"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0, "echo": True}, None, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "prompt_logprobs": 21}, None, 400, "prompt_logprobs"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "logit_bias": {"99999": 1}}, None, 400, "logit_bias"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "logit_bias": {"5": 101}}, None, 400, "logit_bias"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "logit_bias": {"five": 1}}, None, 400, "logit_bias"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "n": 17}, None, 400, "n"),
    ("chat", '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, 400,
     None),
    ("chat", "[" * 100000, None, 400, None),
    ("chat", {"model": MODEL, "messages": MESSAGES, "presence_penalty": 9}, None, 400, "presence_penalty"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "min_p": 1.5}, None, 400, "min_p"),
    ("chat", {"model": MODEL, "messages": MESSAGES, "top_k": -5}, None, 400, "top_k"),
    ("chat", {"model": MODEL, "messages": MESSAGES}, {"Authorization": "Bearer wrong"}, 401, None),
    ("completions", {"model": MODEL}, None, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, None, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [[1, 2], []]}, None, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 99999]}, None, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, None, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, None, 400, "suffix"),
    ("completions", {"model": MODEL, "prompt": "x", "min_tokens": 20, "max_tokens": 5}, None, 400, None),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 3000}, None, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 0}, None, 400, "repetition_penalty"),
    ("completions", {"model": MODEL, "prompt": "x", "min_tokens": 1, "stop_token_ids": [-1000000000]}, None, 400,
     "stop_token_ids"),
    ("completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [-1]}, None, 400, "stop_token_ids"),
    ("completions", {"model": MODEL, "prompt": "x", "stop_token_ids": list(range(65))}, None, 400,
     "stop_token_ids"),
    ("completions", {"model": MODEL, "prompt": ["x"] * 65}, None, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, -5]}, None, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "guided_json": {}}, None, 400, "guided_json"),
    ("completions", {"model": MODEL, "prompt": "x", "seed": 2**70}, None, 400, "seed"),
    ("completions", {"model": MODEL, "prompt": "x", "stream_options": {"continuous_usage_stats": True}}, None, 400,
     "stream_options.continuous_usage_stats"),
]


@pytest.mark.parametrize(("route", "body", "headers", "status", "param"), BAD,
                         ids=[f"{i}-{b[0]}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_inputs_get_openai_errors(url, route, body, headers, status, param):
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[route]
    headers = headers or {"Authorization": f"Bearer {API_KEY}"}
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}{path}", content=content, headers=headers | {"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param


def test_tokenize_detokenize_and_version(url, tiny_ckpt):
    from engine.factory import load_tokenizer

    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "Hello there", "add_special_tokens": False,
                                            "return_token_strs": True}, headers=auth, timeout=30)
    body = r.json()
    assert body["tokens"] == load_tokenizer(tiny_ckpt)("Hello there", add_special_tokens=False).input_ids
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] == 2048
    back = httpx.post(f"{url}/detokenize", json={"tokens": body["tokens"]}, headers=auth, timeout=30)
    assert back.json() == {"prompt": "Hello there"}
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": messages}, headers=auth, timeout=30)
    assert chat.json()["tokens"] == chat_ids(tiny_ckpt, messages)
    served = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1},
                        headers=auth, timeout=30)
    assert served.json()["usage"]["prompt_tokens"] == chat.json()["count"]
    for path, bad, status, param in [("/detokenize", {"tokens": [-1]}, 400, "tokens"),
                                     ("/tokenize", {"prompt": "x", "nope": 1}, 400, "nope"),
                                     ("/tokenize", {"messages": []}, 400, "messages"),
                                     ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model")]:
        r = httpx.post(f"{url}{path}", json=bad, headers=auth, timeout=30)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, bad, r.text)
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/version", timeout=30).json() == {"version": importlib.metadata.version("moe-serve")}


def test_one_log_line_per_request_and_none_while_idle(url, client):
    """The engine replica reports to the metrics hub every second: no line for that (Serve's
    access log is off); the ingress writes one line per client request, with its id."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def lines() -> dict[str, int]:
        return {f.name: len(f.read_text(errors="replace").splitlines()) for f in logs.glob(f"replica_{SHARED}_*.log")}

    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "log me"}],
                                           max_tokens=3, extra_body={"ignore_eos": True})
    time.sleep(1)  # the line is written when the response is done
    before = lines()
    assert any(n.startswith(f"replica_{SHARED}_MetricsHub") for n in before), sorted(before)
    time.sleep(3.5)
    assert lines() == before, "an idle app wrote log lines"
    ingress = "".join(f.read_text(errors="replace") for f in logs.glob(f"replica_{SHARED}_OpenAIIngress_*.log"))
    mine = [line for line in ingress.splitlines() if reply.id in line]
    assert len(mine) == 1 and " 200 " in mine[0] and "completion_tokens=3" in mine[0], mine


def test_server_is_healthy_after_bad_inputs(client):
    r = client.completions.create(model=MODEL, prompt="still here", max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_missing_key_is_rejected_everywhere_under_v1(url):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, f"{url}{path}", json={"model": MODEL, "prompt": "x"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_prefix_cache_hits_show_in_usage_and_metrics(url, client):
    """Two chats that share a long system-like opening: the second finds its prefix cached
    (vLLM's usage field and metric names); greedy output is what transformers gives."""
    opening = "You are a terse assistant who answers in one word. " * 3
    first = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": opening + "Sky?"}])
    second = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                            messages=[{"role": "user", "content": opening + "Sea?"}])
    before = first.usage.prompt_tokens_details.cached_tokens  # at most the chat template's opening block
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert before <= 16 and cached >= len(opening) - 16 and cached % 16 == 0  # whole blocks of 16 tokens
    auth = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", headers=auth).text
        hits = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("moe_serve:prefix_cache_hits_total")]
        if hits and hits[0] >= cached:
            break
        time.sleep(0.5)
    assert hits and hits[0] >= cached and "moe_serve:prefix_cache_queries_total" in text


def test_the_trace_header_stamps_every_hop_of_each_chunk(url):
    """X-MoE-Trace: 1 (bench.hops) puts each token's hop times in its chunk, in the order of the
    path (one monotonic clock on one host); chunks without the header carry none."""
    from engine.trace import FIELD, HEADER, STAMPS

    body = {"model": MODEL, "prompt": "trace me", "max_tokens": 4, "ignore_eos": True, "stream": True}
    chunks = {}
    for traced in (True, False):
        headers = {"Authorization": f"Bearer {API_KEY}"} | ({HEADER: "1"} if traced else {})
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            chunks[traced] = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert len(chunks[True]) == 4 and all(FIELD not in c for c in chunks[False])
    for c in chunks[True]:
        stamps = c[FIELD]
        assert list(stamps) == list(STAMPS)
        times = [stamps[s] for s in STAMPS]
        assert times == sorted(times), stamps


def test_streams_of_one_ingress_share_one_message_per_step(url):
    """On one host the replica sends every step's outputs of an ingress as one message on the
    outputs channel: 4 streams of 40 tokens, started together, take about 40 messages, not 160."""
    import concurrent.futures

    body = {"model": MODEL, "prompt": "together", "max_tokens": 40, "ignore_eos": True, "stream": True}

    def one(_):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=60) as r:
            return sum(1 for x in r.iter_lines() if x.startswith("data: {"))

    handle = engine_handle(SHARED)
    before = sum(c["messages"] for c in handle.outputs_channels.remote().result())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [40] * 4
    channels = handle.outputs_channels.remote().result()
    assert len(channels) == 1 and not channels[0]["lost"]
    sent = channels[0]["messages"] - before
    assert 40 <= sent < 120, sent  # the four overlap for most of their steps: never one message per token
