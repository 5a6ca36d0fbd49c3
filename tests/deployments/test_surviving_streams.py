"""Streams that survive the loss of the replica running them (`deployments/resume.py`), on a
live Serve app of two `disaggregated` replicas (1 attention + 2 expert actors each): an expert
actor of one replica killed mid-stream, a replica scaled down under load (the dead one's
replacement), the only replica's expert actor killed. Each time every stream completes, token
for token and byte for byte what an undisturbed run of the same request gives (greedy, seeded
sampling with penalties, a JSON schema, a LoRA adapter, n=2, min_tokens), with the usage an
uninterrupted request reports.

The replica count follows a file (`replicas_from_file.py`, a Serve autoscaling policy), so the
tests scale down at the moment they choose; with `max_ongoing_requests` of 4, more than four
streams in flight at once means both replicas run some."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from tests.deployments.conftest import deploy, engine_handle, undeploy
from tests.lora_adapters import write_adapter

MODEL = "tiny"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
          "required": ["name", "tags"], "additionalProperties": False}
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2}
N = 256
MAX_ONGOING = 4  # per replica: the eight streams take both
REQUESTS = {  # name -> (route, body); each streams with token ids and usage
    "greedy": ("completions", {"prompt": "the first stream", "temperature": 0}),
    "greedy_chat": ("chat/completions", {"messages": [{"role": "user", "content": "hello there"}],
                                         "temperature": 0}),
    "seeded_penalties": ("completions", {"prompt": "a sampled one", "temperature": 1.0, "top_p": 0.9,
                                         "seed": 7, **PENALTIES}),
    "seeded_chat": ("chat/completions", {"messages": [{"role": "user", "content": "tell me"}], "temperature": 0.9,
                                         "seed": 11, **PENALTIES}),
    "json_schema": ("chat/completions", {"messages": [{"role": "user", "content": "json please"}],
                                         "temperature": 0.8, "seed": 3, "max_tokens": 200, "ignore_eos": False,
                                         "response_format": {"type": "json_schema", "json_schema": {
                                             "name": "thing", "schema": SCHEMA}}}),
    "lora": ("completions", {"model": "alpha", "prompt": "an adapter's turn", "temperature": 0}),
    "n2": ("completions", {"prompt": "two at once", "n": 2, "temperature": 1.0, "seed": 5}),
    "min_tokens": ("completions", {"prompt": "not before twenty", "temperature": 1.0, "seed": 21, "min_tokens": 20,
                                   "ignore_eos": False, "logprobs": 2}),
}


@pytest.fixture(scope="module")
def replicas_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("replicas") / "count"
    path.write_text("2")
    return path


@pytest.fixture(scope="module")
def url(serve_http, tiny_ckpt, tmp_path_factory, replicas_file):
    alpha = write_adapter(tiny_ckpt, tmp_path_factory.mktemp("survive-adapters") / "alpha", seed=1, rank=4)
    args = {"model": str(tiny_ckpt), "served_model_name": MODEL, "layout": "disaggregated", "attention_workers": 1,
            "expert_groups": 2, "max_model_len": 512, "kv_cache_blocks": 128, "block_size": 8,
            "cpus_per_worker": 0.25, "comm_timeout_s": 10, "lora_modules": {"alpha": str(alpha)}, "max_loras": 1,
            "max_lora_rank": 4, "resume_timeout_s": 120, "drain_timeout_s": 0, "stream_keepalive_s": 0.5}
    policy = {"policy_function": "tests.deployments.replicas_from_file:ReplicasFromFile",
              "policy_kwargs": {"path": str(replicas_file)}}
    options = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 2,
                                      "policy": policy, "upscale_delay_s": 0, "downscale_delay_s": 0,
                                      "metrics_interval_s": 0.5},
               "max_ongoing_requests": MAX_ONGOING}
    url = deploy(serve_http, "survive", args, options)
    wait_for_replicas("survive", 2)
    yield url
    undeploy("survive")


def replica_states(app: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[app].deployments["MoEEngine"].replica_states)


def wait_for_replicas(app: str, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = replica_states(app)
        if states.get("RUNNING", 0) == n and sum(states.values()) == n:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{app}: not {n} replicas running: {replica_states(app)}")


class Stream:
    """One streamed request read the way a client reads it: per choice its token ids, text and
    finish reason; the usage; how many `: resuming` comments came."""

    def __init__(self, url: str, name: str):
        route, body = REQUESTS[name]
        self.url, self.route = url, route
        self.body = {"model": MODEL, "max_tokens": N, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True}, "return_tokens_as_token_ids": True} | body
        self.body.setdefault("logprobs", True if route.startswith("chat") else 0)
        self.tokens: dict[int, list[int]] = {}
        self.text: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.usage, self.resuming, self.error, self.done = None, 0, None, False
        self.cut = False  # in flight when the fault came (run_all)
        self.started, self.first_at = time.monotonic(), None

    def run(self) -> Stream:
        with httpx.stream("POST", f"{self.url}/v1/{self.route}", json=self.body, timeout=300) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line == ": resuming":
                    self.resuming += 1
                elif line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    self._frame(json.loads(line[6:]))
        return self

    def _frame(self, frame: dict) -> None:
        if "error" in frame:
            self.error = frame["error"]
        if frame.get("usage"):
            self.usage = frame["usage"]
        for c in frame.get("choices", ()):
            i = c["index"]
            lp = c.get("logprobs") or {}
            entries = lp.get("content") if self.route.startswith("chat") else lp.get("tokens")
            ids = [int(re.sub(r"^token_id:", "", e["token"] if isinstance(e, dict) else e)) for e in entries or ()]
            self.tokens.setdefault(i, []).extend(ids)
            if self.first_at is None and ids:
                self.first_at = round(time.monotonic() - self.started, 2)
            piece = c["delta"].get("content") or "" if "delta" in c else c.get("text", "")
            self.text[i] = self.text.get(i, "") + piece
            if c.get("finish_reason"):
                self.finish[i] = c["finish_reason"]

    def seen(self) -> int:
        return min((len(t) for t in self.tokens.values()), default=0)

    def outcome(self) -> tuple:
        return self.tokens, self.text, self.finish, self.usage, self.error, self.done


def in_flight(s: Stream) -> bool:
    return s.seen() >= 3 and not s.finish


def more_than_one_replica_takes(streams: dict[str, Stream]) -> bool:
    return sum(map(in_flight, streams.values())) > MAX_ONGOING


class NeverReady(Exception):
    """Every stream ended before the moment to act came (run_all)."""


def run_all(url: str, names, act=None, ready=None) -> dict[str, Stream]:
    """Stream the named requests at once; once `ready(streams)` (by default: each has at least
    3 tokens or has ended), `act()` (a fault). Each stream's `cut` says whether it was in
    flight then (3 tokens or more, not finished). `NeverReady` if all ended first."""
    streams = {name: Stream(url, name) for name in names}
    threads = {name: threading.Thread(target=s.run, daemon=True) for name, s in streams.items()}
    for t in threads.values():
        t.start()
    if act is not None:
        deadline = time.monotonic() + 60
        ready = ready or (lambda _: all(s.seen() >= 3 or not threads[n].is_alive() for n, s in streams.items()))
        while not ready(streams):
            state = str({n: (s.seen(), s.first_at) for n, s in streams.items()})
            if not any(t.is_alive() for t in threads.values()):
                raise NeverReady(state)
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        for s in streams.values():
            s.cut = in_flight(s)
        act()
    for t in threads.values():
        t.join(timeout=300)
    return streams


def run_on_both_replicas(url: str, act) -> dict[str, Stream]:
    """run_all, acting once more streams are in flight than one replica takes. The ingress
    learns of a replica Serve reports RUNNING a moment later (its router's long poll): until it
    has, every stream queues on the one replica it knows and the moment never comes; then the
    same requests again, a few times at most."""
    for attempt in range(4):
        try:
            return run_all(url, REQUESTS, act, ready=more_than_one_replica_takes)
        except NeverReady as never:
            if attempt == 3:
                raise AssertionError(f"never more than {MAX_ONGOING} streams in flight at once: {never}") from None
            print(f"\nnot yet on both replicas ({never}); again")
            time.sleep(2)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(rf"^moe_serve:{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def resumed_total(url: str) -> float:
    return metric(url, "requests_resumed_total")


def resume_report(url: str, before: tuple[float, float]) -> str:
    """The resumptions since `before` (resume_seconds' count and sum then) and their mean time."""
    n, total = metric(url, "resume_seconds_count") - before[0], metric(url, "resume_seconds_sum") - before[1]
    return f"{n:.0f} request(s) resumed, {total / n if n else 0:.2f} s on average from the loss to the next output"


def resume_counts(url: str) -> tuple[float, float]:
    return metric(url, "resume_seconds_count"), metric(url, "resume_seconds_sum")


def kill_an_expert_actor(app: str, killed: list[str] | None = None) -> None:
    """Kill an expert actor of one of the replicas (whichever answers); its replica's id goes
    to `killed`."""
    import ray

    workers = engine_handle(app).workers.remote().result()
    name = workers["names"][2]  # moe-<replica id>-rank2
    ray.kill(ray.get_actor(name, namespace=workers["namespace"]), no_restart=True)
    if killed is not None:
        killed.append(name.removeprefix("moe-").rsplit("-rank", 1)[0])


def wait_until_gone(app: str, replica_id: str, timeout: float = 60) -> None:
    """Until Serve has stopped that replica's actor (its health check failed)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(f"SERVE_REPLICA::{app}#MoEEngine#{replica_id}", namespace="serve")
        except ValueError:
            return
        time.sleep(0.25)
    raise TimeoutError(f"replica {replica_id} still there")


def check_same(disturbed: dict[str, Stream], undisturbed: dict[str, Stream]) -> None:
    for name, s in disturbed.items():
        ref = undisturbed[name]
        assert s.error is None and s.done, (name, s.error)
        assert s.tokens == ref.tokens, name
        assert s.text == ref.text, name
        assert s.finish == ref.finish, name
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached tokens differ: a warm cache
        assert {k: s.usage[k] for k in counts} == {k: ref.usage[k] for k in counts}, name


@pytest.fixture(scope="module")
def undisturbed(url):
    streams = run_all(url, REQUESTS)
    for name, s in streams.items():
        assert s.error is None and s.done and s.resuming == 0, name
        assert all(len(t) >= 3 for t in s.tokens.values()), name  # long enough to be cut mid-stream
    json.loads(streams["json_schema"].text[0])
    assert len(streams["n2"].tokens) == 2 and streams["n2"].tokens[0] != streams["n2"].tokens[1]
    return streams


@pytest.fixture(scope="module")
def killed() -> list[str]:
    return []


def test_streams_on_a_replica_whose_expert_actor_dies_resume_on_the_other(url, undisturbed, killed):
    before, times = resumed_total(url), resume_counts(url)
    # killed once more streams are in flight than one replica takes: both replicas run some,
    # whichever replica's actor is killed
    streams = run_on_both_replicas(url, lambda: kill_an_expert_actor("survive", killed))
    assert sum(s.cut for s in streams.values()) > MAX_ONGOING
    check_same(streams, undisturbed)
    resumed = resumed_total(url) - before
    assert resumed >= 1 and sum(s.resuming > 0 for s in streams.values()) >= 1
    print(f"\nan expert actor killed: {resume_report(url, times)}, on the other replica")


def test_a_replica_scaled_down_under_load_hands_its_streams_over(url, undisturbed, replicas_file, killed):
    """After the previous test the dead replica's replacement is the newest: the one Serve stops."""
    if killed:
        wait_until_gone("survive", killed[-1])
    wait_for_replicas("survive", 2)
    before, times = resumed_total(url), resume_counts(url)
    # scaled down once more streams are in flight than one replica takes: both replicas run
    # some, the one stopped (Serve stops the newest) too; drained with no time to finish
    streams = run_on_both_replicas(url, lambda: replicas_file.write_text("1"))
    assert sum(s.cut for s in streams.values()) > MAX_ONGOING
    check_same(streams, undisturbed)
    wait_for_replicas("survive", 1)
    resumed = resumed_total(url) - before
    assert resumed >= 1
    print(f"\nscaled down: {resume_report(url, times)}")


def test_streams_of_the_only_replica_resume_on_its_replacement(url, undisturbed):
    """Three streams and one request that does not stream (greedy_chat, answered whole) on the
    only replica, whose expert actor dies: all four go on on its replacement."""
    wait_for_replicas("survive", 1)  # after the scale-down
    names = ["seeded_penalties", "json_schema", "n2"]
    old = engine_handle("survive").workers.remote().result()["names"]
    before, times = resumed_total(url), resume_counts(url)
    start = time.monotonic()
    whole: list[httpx.Response] = []
    route, body = REQUESTS["greedy_chat"]
    body = {"model": MODEL, "max_tokens": N, "ignore_eos": True} | body
    sender = threading.Thread(target=lambda: whole.append(httpx.post(f"{url}/v1/{route}", json=body, timeout=300)))
    sender.start()
    streams = run_all(url, names, lambda: kill_an_expert_actor("survive"))
    sender.join(timeout=300)
    check_same(streams, undisturbed)
    assert whole and whole[0].status_code == 200, whole and whole[0].text
    answer, ref = whole[0].json(), undisturbed["greedy_chat"]
    assert answer["choices"][0]["message"]["content"] == ref.text[0]
    assert answer["usage"]["completion_tokens"] == ref.usage["completion_tokens"] == N
    assert resumed_total(url) - before >= 3  # all that ran when it died (one may have ended)
    assert engine_handle("survive").workers.remote().result()["names"] != old  # its replacement served them
    print(f"\nthe only replica: {resume_report(url, times)}, on its replacement; "
          f"{time.monotonic() - start:.1f} s in all")
