"""Soak: minutes of mixed, partly hostile load; memory, statuses and the KV pool before and after.

    python -m bench.soak [--minutes 10] [--concurrency 32] [--model DIR]

Starts the app as `serve_config.yaml` does (Ray on loopback, `disaggregated` with 1 attention
and 2 expert workers, the embedded tiny model unless `--model`), then keeps `--concurrency`
clients busy. Each request is drawn from a fixed mix: whole and streamed completions and chats
(70%), streams the client drops after a few events (10%), malformed or hostile requests (15%),
and prompts over the context (5%). After a warm-up the resident set of every process of the
Ray session is read, then after each quarter of the run, and at the end once the load has
stopped and the engine is idle: a leak shows as growth that goes on quarter after quarter,
where warming caches level off. Prints a table (and writes bench/results/soak.md): requests by
kind and status, RSS per process over the run, and the engine's free KV blocks before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MODEL = "soak"

HOSTILE = [
    "{not json",
    json.dumps({"model": MODEL, "prompt": "x", "min_tokens": 1, "stop_token_ids": [-1000000000]}),
    json.dumps({"model": MODEL, "prompt": [1, 99999]}),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
    json.dumps({"model": MODEL, "prompt": "x", "stop": ["s"] * 40}),
    json.dumps({"model": MODEL, "prompt": "x", "logit_bias": {"-3": 5}}),
    json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
    json.dumps({"model": MODEL, "prompt": "x", "n": 1000}),
    json.dumps({"model": "other", "prompt": "x"}),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}),
]


def start_app(model: Path) -> str:
    import ray
    from ray import serve

    from cluster import serve_env
    from deployments.app import make_app
    from moe_parallel.parallel.launch import free_port

    with serve_env.applied():  # the cluster as `make serve` starts it
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(model), "served_model_name": MODEL, "layout": "disaggregated", "attention_workers": 1,
            "expert_groups": 2, "max_model_len": 512, "max_num_seqs": 32, "kv_cache_blocks": 1024,
            "cpus_per_worker": 0.25}
    serve.run(make_app(args, {"num_replicas": 1, "max_ongoing_requests": 32}), name="soak", route_prefix="/")
    return serve_env.api_url(f"http://127.0.0.1:{port}")  # the ingress replica's own port, as shipped


def session_processes() -> dict[int, str]:
    """pid -> name of the driver and every process of the Ray session (raylet, GCS, workers)."""
    import os

    import psutil

    out = {os.getpid(): "driver (client + Serve controller handle)"}
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "default_worker" in cmd:
            out[p.info["pid"]] = _name(cmd)
    return out


def _name(cmd: str) -> str:
    for marker in ("ray::", "raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py"):
        if marker in cmd:
            tail = cmd[cmd.index(marker):].split()[0]
            return tail[:60]
    return cmd.split()[0][-40:]


def rss(pids: dict[int, str]) -> dict[int, int]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            out[pid] = -1
    return out


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, counts: Counter) -> None:
    r = rng.random()
    if r < 0.70:
        kind = "normal"
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        body = {"model": MODEL, "max_tokens": rng.randint(8, 64), "stream": stream, "temperature": rng.random()}
        if chat:
            body["messages"] = [{"role": "user", "content": f"tell me about {rng.randint(0, 9999)}"}]
        else:
            body["prompt"] = f"Once upon a time {rng.randint(0, 9999)}"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if stream:
            async with client.stream("POST", url + path, json=body) as resp:
                frames = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
                status = resp.status_code if frames and frames[-1] == "data: [DONE]" else f"{resp.status_code}-cut"
                if any('"error"' in f for f in frames):
                    status = f"{resp.status_code}-error-frame"
        else:
            status = (await client.post(url + path, json=body)).status_code
    elif r < 0.80:
        kind = "disconnect"
        body = {"model": MODEL, "prompt": "a long one", "max_tokens": 200, "stream": True, "ignore_eos": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= rng.randint(1, 6):
                    break  # the client walks away mid-stream
            status = resp.status_code
    elif r < 0.95:
        kind = "hostile"
        content = rng.choice(HOSTILE)
        path = "/v1/chat/completions" if "messages" in content else "/v1/completions"
        headers = {"Content-Type": "application/json"}
        status = (await client.post(url + path, content=content, headers=headers)).status_code
    else:
        kind = "over_context"
        body = {"model": MODEL, "prompt": "word " * 600, "max_tokens": 10}
        status = (await client.post(url + "/v1/completions", json=body)).status_code
    counts[(kind, str(status))] += 1


async def load(url: str, seconds: float, concurrency: int, seed: int) -> Counter:
    counts: Counter = Counter()
    deadline = time.monotonic() + seconds

    async def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < deadline:
                try:
                    await one(client, url, rng, counts)
                except httpx.HTTPError as exc:
                    counts[("transport", type(exc).__name__)] += 1

    await asyncio.gather(*[client_loop(i) for i in range(concurrency)])
    return counts


def render(counts: Counter, samples: list[dict], names: dict, kv: tuple, minutes: float,
           concurrency: int) -> str:
    total = sum(counts.values())
    lines = [f"Soak: {minutes:g} min, {concurrency} concurrent clients, {total} requests "
             f"({total / (minutes * 60):.1f}/s).", "", "| kind | status | requests |", "| --- | --- | ---: |"]
    lines += [f"| {k} | {s} | {n} |" for (k, s), n in sorted(counts.items())]
    lines += ["", "RSS in MiB after warm-up, after each quarter of the run, and at the end (idle):", "",
              "| process | start | 1/4 | 2/4 | 3/4 | end | change | change over the second half |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first, last = samples[0], samples[-1]
    for pid, name in sorted(names.items(), key=lambda kv_: -first.get(kv_[0], 0)):
        values = [s.get(pid, -1) for s in samples]
        if min(values) <= 0:
            continue
        mib = " | ".join(f"{v / 2**20:.0f}" for v in values)
        b, a, half = first[pid], last[pid], samples[2][pid]
        lines.append(f"| {name} ({pid}) | {mib} | {(a - b) / 2**20:+.0f} MiB ({(a - b) / b:+.1%}) | "
                     f"{(a - half) / 2**20:+.0f} MiB |")
    lines += ["", f"Free KV blocks (per attention worker): {kv[0]} after warm-up, {kv[1]} at the end."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-mixtral")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    url = start_app(args.model)
    try:
        handle = serve.get_deployment_handle("MoEEngine", app_name="soak")
        asyncio.run(load(url, 20, args.concurrency, seed=args.seed + 1))  # warm-up: every path, allocator pools
        time.sleep(5)
        names = session_processes()
        samples, kv_before = [rss(names)], handle.kv_free_blocks.remote().result()
        counts: Counter = Counter()
        for quarter in range(4):
            counts += asyncio.run(load(url, args.minutes * 15, args.concurrency, seed=args.seed * 4 + quarter))
            if quarter < 3:
                samples.append(rss(names))
        time.sleep(5)  # disconnects settle, the engine goes idle
        samples.append(rss(names))
        kv_after = handle.kv_free_blocks.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    table = render(counts, samples, names, (kv_before, kv_after), args.minutes, args.concurrency)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
