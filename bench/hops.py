"""Every hop a token crosses, timed: the served path against the same engine in process.

    python -m bench.hops [--concurrency 1 32] [--output-len 32] [--repeats 2] [--model DIR]

Two sides, each in a fresh process, one after the other, on the same model and load:

- **in process**: the engine replica's own class (`EngineDeployment`, the args of
  `serve_config.yaml`) built in this process, its instance on Ray actors as served, and the
  load driven through its `generate` directly;
- **HTTP**: the app as `serve_config.yaml` builds it (one engine replica), streamed
  completions through Serve's proxy with the `X-MoE-Trace: 1` header, so every SSE chunk
  carries the times its token passed each hop (`engine.trace`).

`concurrency` clients keep one request each in flight, `--requests-per-client` requests each
(prompt `--prompt-len` tokens, exactly `--output-len` generated, greedy, EOS ignored). Reported:
tok/s, TTFT and ITL per side and their ratio; per token, the mean time between each pair of
hops (decode tokens; the first token's path separately); each decode token's wait after the
previous one split by the engine's steps in between, against the ITL the client measured; the
processes and the CPU time each kind of process spent per generated token; the messages per
generated token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from engine.trace import FIELD, HEADER

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
HOPS = (("scheduled", "dispatched", "engine: schedule the step"),
        ("dispatched", "rank_start", "engine -> attention rank (step channel)"),
        ("rank_start", "rank_end", "attention rank: the step (experts' exchange included)"),
        ("rank_end", "executed", "attention rank -> engine"),
        ("executed", "queued", "engine: apply, detokenise, queue"),
        ("queued", "replica_yield", "engine replica: the request's stream takes it, the step's message goes"),
        ("replica_yield", "ingress_recv", "engine replica -> ingress (outputs channel)"),
        ("ingress_recv", "ingress_send", "ingress: OpenAI chunk"),
        ("ingress_send", "client", "ingress -> client (HTTP; via Serve's proxy where direct ingress is off)"))


def served_args(model: Path) -> tuple[dict, dict]:
    """serve_config.yaml's app args on `model`, and the engine deployment's options (one replica)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    args = dict(config["args"]) | {"model": str(Path(model).resolve()), "served_model_name": "bench"}
    engine = next(d for d in config["deployments"] if d["name"] == "MoEEngine")
    options = {k: engine[k] for k in ("max_ongoing_requests", "max_queued_requests") if k in engine}
    return args, options | {"num_replicas": 1}


def prompts(n: int, length: int) -> list[list[int]]:
    return [[1] + [(7 * i + j) % 250 + 3 for j in range(length - 1)] for i in range(n)]


async def drive(one, concurrency: int, requests: int, prompt_len: int) -> dict:
    """`concurrency` loops, each running requests one after the other: one(prompt) -> [(client time, trace)]."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts(requests, prompt_len):
        queue.put_nowait(p)
    streams: list[list[tuple[float, dict]]] = []
    starts: list[float] = []

    async def loop():
        while not queue.empty():
            prompt = queue.get_nowait()
            start = time.monotonic()
            got = await one(prompt)
            streams.append(got)
            starts.append(start)

    start = time.monotonic()
    await asyncio.gather(*[loop() for _ in range(concurrency)])
    elapsed = time.monotonic() - start
    tokens = sum(len(s) for s in streams)
    return {"concurrency": concurrency, "elapsed": elapsed, "tokens": tokens, "streams": streams,
            "starts": starts}


async def sweep(one, args) -> list[dict]:
    """A warm-up, the idle CPU, then every concurrency level with the CPU it took."""
    await drive(lambda p: one(p, 4), 1, 1, args.prompt_len)
    idle = await idle_cpu()
    rows = []
    for c in args.concurrency:
        cpu = CpuMeter()
        row = await drive(one, c, c * args.requests_per_client, args.prompt_len)
        row["cpu"], row["procs"] = cpu.done()
        row["idle"] = idle
        rows.append(row)
    return rows


# -- the two sides ------------------------------------------------------------------------------


def run_engine(args, model: Path) -> list[dict]:
    import ray

    from deployments.engine_deployment import EngineDeployment
    from moe_parallel.contract import SamplingParams

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        app_args, _ = served_args(model)
        dep = EngineDeployment(app_args)
        counter = iter(range(10**9))

        async def one(prompt, output_len=args.output_len):
            params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
            got = []
            async for chunk in dep.generate(f"r{next(counter)}", prompt, params, None, True):
                now = time.monotonic()
                got.extend((now, out.trace) for out in chunk)
            return got

        rows = asyncio.run(sweep(one, args))
        if dep.instance is not None:
            dep.instance.shutdown()
        return rows
    finally:
        ray.shutdown()


def run_http(args, model: Path) -> list[dict]:
    import httpx
    import ray
    from ray import serve

    from cluster import serve_env
    from deployments.app import make_app
    from moe_parallel.parallel.launch import free_port

    with serve_env.applied():  # the cluster as `make serve` starts it (--serve-env values go first)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_args, options = served_args(model)
        serve.run(make_app(app_args, options), name="bench", route_prefix="/")
        # the ingress replica's own port (direct ingress, as shipped), or the proxy's where it is off
        url = serve_env.api_url(f"http://127.0.0.1:{port}") + "/v1/completions"

        async def main():
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as client:
                async def one(prompt, output_len=args.output_len):
                    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "stream": True,
                            "ignore_eos": True, "temperature": 0}
                    got = []
                    async with client.stream("POST", url, json=body, headers={HEADER: "1"}) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                now = time.monotonic()
                                chunk = json.loads(line[6:])
                                if chunk.get("choices"):
                                    got.append((now, chunk[FIELD]))
                    return got

                return await sweep(one, args)

        return asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()


IDLE_S = 5.0


async def idle_cpu() -> dict[str, float]:
    """CPU ms per second each kind of process spends while nothing is asked of it."""
    cpu = CpuMeter()
    await asyncio.sleep(IDLE_S)
    return {k: v / IDLE_S * 1e3 for k, v in cpu.done()[0].items()}


class CpuMeter:
    """CPU seconds (user + system) spent by each kind of process on this host since it was made."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def kind(p) -> str:
        import os

        if p.pid == os.getpid():
            return "bench driver (clients; in process: the engine)"
        title = " ".join(p.cmdline()) or p.name()
        for key, name in (("OpenAIIngress", "ingress replica"), ("MoEEngine", "engine replica"),
                          ("ProxyActor", "Serve proxy"), ("ServeController", "Serve controller"),
                          ("MetricsHub", "metrics hub"), ("RankActor", "model ranks (attention + experts)"),
                          ("raylet", "Ray raylet"), ("gcs_server", "Ray GCS")):
            if key in title:
                return name
        return "other Ray processes" if "ray" in title.lower() else "other"

    def _read(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                out[p.pid] = (self.kind(p), t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return out

    def done(self) -> tuple[dict[str, float], dict[str, int]]:
        cpu: dict[str, float] = defaultdict(float)
        procs: dict[str, int] = defaultdict(int)
        for pid, (kind, t) in self._read().items():
            cpu[kind] += t - self.start.get(pid, (kind, 0.0))[1]
            procs[kind] += 1
        return dict(cpu), dict(procs)


# -- the tables ---------------------------------------------------------------------------------


def pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def summary(row: dict) -> dict:
    ttft = [s[0][0] - t0 for s, t0 in zip(row["streams"], row["starts"], strict=True)]
    itl = [b[0] - a[0] for s in row["streams"] for a, b in zip(s, s[1:], strict=False)]
    return {"tok_s": row["tokens"] / row["elapsed"], "ttft_p50": pct(ttft, 50), "itl_p50": pct(itl, 50),
            "itl_mean": statistics.fmean(itl) if itl else float("nan")}


def hop_means(row: dict, first: bool) -> dict[str, float]:
    """Mean seconds per token between consecutive stamps (decode tokens, or the first tokens)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for s in row["streams"]:
        picked = s[:1] if first else s[1:]
        for client_t, trace in picked:
            stamps = trace | {"client": client_t}
            for a, b, _ in HOPS:
                if a in stamps and b in stamps:
                    sums[a + ">" + b].append(stamps[b] - stamps[a])
    return {k: statistics.fmean(v) for k, v in sums.items()}


def itl_split(row: dict) -> dict[str, float]:
    """Each decode token's wait after its stream's previous token, as the engine saw it: from the
    end of the step that made the previous token to the end of the one that made this token, by
    part (applying the previous step's outputs and the event loop until the next step began, then
    schedule, to the rank, the rank's step, back); means over the tokens. `sum` is what the
    engine's clock says of the inter-token latency the client measures on its own clock."""
    steps = {}
    for s in row["streams"]:
        for _, trace in s:
            steps.setdefault(trace["scheduled"], trace)
    order = sorted(steps)
    index = {t: i for i, t in enumerate(order)}
    parts = [{}]  # parts[k]: step k's, from the end of step k-1
    for k in range(1, len(order)):
        x, prev = steps[order[k]], steps[order[k - 1]]
        parts.append({"apply + event loop until the next step": x["scheduled"] - prev["executed"],
                      "schedule": x["dispatched"] - x["scheduled"], "to rank": x["rank_start"] - x["dispatched"],
                      "rank step": x["rank_end"] - x["rank_start"], "from rank": x["executed"] - x["rank_end"]})
    sums: dict[str, list[float]] = defaultdict(list)
    for s in row["streams"]:
        for (_, a), (_, b) in zip(s, s[1:], strict=False):
            between = parts[index[a["scheduled"]] + 1:index[b["scheduled"]] + 1]
            for k in between[0] if between else ():
                sums[k].append(sum(p[k] for p in between))
            sums["sum"].append(b["executed"] - a["executed"])
    return {k: statistics.fmean(v) for k, v in sums.items()}


def messages(row: dict, http: bool, layers: int, expert_ranks: int) -> dict[str, float]:
    steps = {trace["scheduled"] for s in row["streams"] for _, trace in s}
    sent = {trace["replica_yield"] for s in row["streams"] for _, trace in s if "replica_yield" in trace}
    tokens = row["tokens"]
    out = {"engine steps": len(steps) / tokens,
           "engine <-> attention rank (step channel, both ways)": 2 * len(steps) / tokens,
           "attention rank <-> expert ranks (shared memory, both ways)":
               2 * layers * expert_ranks * len(steps) / tokens}
    if http:
        out["engine replica -> ingress (outputs channel messages)"] = len(sent) / tokens
        out["ingress -> client (SSE frames)"] = 1.0
    return out


def render(args, engine_rows: list[dict], http_rows: list[dict], layers: int, expert_ranks: int) -> str:
    lines = [f"Prompt {args.prompt_len} tokens, {args.output_len} generated per request, "
             f"{args.requests_per_client} requests per client, greedy; `serve_config.yaml`'s layout and args "
             f"(one engine replica), bench-214m; each side run {args.repeats} time(s), alternating, the fastest "
             "run per side and level kept.", "",
             "| streams | in-process tok/s | HTTP tok/s | HTTP / in-process | in-process TTFT p50 (ms) | "
             "HTTP TTFT p50 (ms) | in-process ITL p50 (ms) | HTTP ITL p50 (ms) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e, h in zip(engine_rows, http_rows, strict=True):
        se, sh = summary(e), summary(h)
        lines.append(f"| {e['concurrency']} | {se['tok_s']:.1f} | {sh['tok_s']:.1f} | "
                     f"{sh['tok_s'] / se['tok_s']:.2f}x | {se['ttft_p50'] * 1e3:.0f} | {sh['ttft_p50'] * 1e3:.0f} | "
                     f"{se['itl_p50'] * 1e3:.1f} | "
                     f"{sh['itl_p50'] * 1e3:.1f} |")
    for h, e in zip(http_rows, engine_rows, strict=True):
        c = h["concurrency"]
        dec, first = hop_means(h, False), hop_means(h, True)
        dec_e = hop_means(e, False)
        lines += ["", f"Per token at {c} stream{'s' if c > 1 else ''}, mean ms from one hop to the next "
                  "(in process the client is the engine replica's consumer):", "",
                  "| hop | HTTP, decode tokens | HTTP, first tokens | in process, decode tokens |",
                  "| --- | ---: | ---: | ---: |"]
        for a, b, name in HOPS:
            k = a + ">" + b
            lines.append(f"| {name} | {_ms(dec.get(k))} | {_ms(first.get(k))} | {_ms(dec_e.get(k))} |")
        total = sum(dec.get(a + ">" + b, 0.0) for a, b, _ in HOPS)
        lines.append(f"| **step start -> client** | **{total * 1e3:.2f}** | "
                     f"**{sum(first.get(a + '>' + b, 0.0) for a, b, _ in HOPS) * 1e3:.2f}** | |")
        arrival = [trace["scheduled"] - trace["arrival"] for s in h["streams"] for _, trace in s[:1]]
        lines.append("| first token only: arrival -> its first step scheduled | | "
                     f"{_ms(statistics.fmean(arrival))} | |")
        split, split_e = itl_split(h), itl_split(e)
        itl, itl_e = summary(h)["itl_mean"], summary(e)["itl_mean"]
        lines += ["", f"A decode token's wait after its stream's previous one at {c} stream{'s' if c > 1 else ''}, "
                  "mean ms: the engine's steps in between, by part, against the ITL the client measured:", "",
                  "| part | HTTP | in process |", "| --- | ---: | ---: |"]
        for k in ("apply + event loop until the next step", "schedule", "to rank", "rank step", "from rank"):
            lines.append(f"| {k} | {_ms(split.get(k))} | {_ms(split_e.get(k))} |")
        lines.append(f"| **sum (engine clock)** | **{_ms(split.get('sum'))}** | **{_ms(split_e.get('sum'))}** |")
        lines.append(f"| client's mean ITL (client clock) | {_ms(itl)} | {_ms(itl_e)} |")
        if split.get("sum"):
            lines.append(f"| sum / client's mean ITL | {split['sum'] / itl:.2f} | {split_e['sum'] / itl_e:.2f} |")
        tokens_h, tokens_e = h["tokens"], e["tokens"]
        lines += ["", f"CPU ms per generated token at {c} stream{'s' if c > 1 else ''}, by kind of process "
                  "(processes), and CPU ms per second the same processes spend idle:", "",
                  "| process | HTTP | in process | HTTP, idle ms/s | in process, idle ms/s |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        kinds = sorted(set(h["cpu"]) | set(e["cpu"]), key=lambda k: -h["cpu"].get(k, 0.0))
        for k in kinds:
            lines.append(f"| {k} | {h['cpu'].get(k, 0.0) / tokens_h * 1e3:.2f} ({h['procs'].get(k, 0)}) | "
                         f"{e['cpu'].get(k, 0.0) / tokens_e * 1e3:.2f} ({e['procs'].get(k, 0)}) | "
                         f"{h['idle'].get(k, 0.0):.0f} | {e['idle'].get(k, 0.0):.0f} |")
        lines.append(f"| **all** | **{sum(h['cpu'].values()) / tokens_h * 1e3:.2f}** | "
                     f"**{sum(e['cpu'].values()) / tokens_e * 1e3:.2f}** |")
        msgs = messages(h, True, layers, expert_ranks)
        lines += ["", f"Messages per generated token at {c} stream{'s' if c > 1 else ''} (HTTP):", "",
                  "| path | per token |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in msgs.items()]
    return "\n".join(lines) + "\n"


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v * 1e3:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: bench-214m)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each side, alternating; the fastest per side and level is reported")
    ap.add_argument("--serve-env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="environment for the HTTP side's Ray processes (e.g. Ray Serve's own switches)")
    ap.add_argument("--side", choices=["engine", "http"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from bench.models import bench_model

    model = args.model or bench_model()
    if args.side:
        rows = run_engine(args, model) if args.side == "engine" else run_http(args, model)
        print("ROWS " + json.dumps(rows))
        return 0
    sides: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # the sides alternate; per side and level the fastest run is kept
        for side in ("engine", "http"):
            cmd = [sys.executable, "-m", "bench.hops", *(argv if argv is not None else sys.argv[1:]), "--side", side]
            env = os.environ | (dict(kv.split("=", 1) for kv in args.serve_env) if side == "http" else {})
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"bench.hops: the {side} side failed (exit {out.returncode})")
            line = next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("ROWS "))
            rows = json.loads(line[5:])
            kept = sides.setdefault(side, rows)
            for i, row in enumerate(rows):
                if row["tokens"] / row["elapsed"] > kept[i]["tokens"] / kept[i]["elapsed"]:
                    kept[i] = row
    from moe_parallel.model.config import ModelConfig

    config = ModelConfig.from_dir(model)
    app_args, _ = served_args(model)
    table = render(args, sides["engine"], sides["http"], config.num_layers, int(app_args.get("expert_groups", 2)))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hops.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
