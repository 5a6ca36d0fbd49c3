"""Load through the HTTP route: TTFT, inter-token latency and output tokens/s per concurrency.

    python -m bench.http_load [--url http://127.0.0.1:8000] [--concurrency 1 8 32] [--compare single]

Without `--url` it starts the app itself (Ray on loopback, `serve_config.yaml`'s layout on
the bench-214m model by default, or `--model DIR`), runs the sweep, and shuts everything
down. Every request streams a completion of exactly `--output-len` tokens (EOS ignored), and
`concurrency` clients keep one request each in flight for `--requests` requests in total.
Latencies are measured by the client from the SSE events it receives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                      output_len: int) -> tuple[float, list[float], int]:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "stream": True, "ignore_eos": True,
            "temperature": 0}
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:]).get("choices"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the stream carried no tokens")
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], len(stamps)


async def sweep_level(url: str, model: str, concurrency: int, requests: int, prompt_len: int,
                      output_len: int) -> dict:
    prompts = [[1] + [(7 * i + j) % 250 + 3 for j in range(prompt_len - 1)] for i in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttft, itl, tokens = [], [], 0

    async def client_loop(client):
        nonlocal tokens
        while not queue.empty():
            first, gaps, n = await one_request(client, url, model, queue.get_nowait(), output_len)
            ttft.append(first)
            itl.extend(gaps)
            tokens += n

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*[client_loop(client) for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "tok_s": tokens / elapsed}


def pct(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def render(rows: list[dict], note: str) -> str:
    lines = [note, "", "| concurrency | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | output tok/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | "
                     f"{r['itl_p50'] * 1e3:.1f} | {r['itl_p99'] * 1e3:.1f} | {r['tok_s']:.1f} |")
    return "\n".join(lines) + "\n"


def start_app(model: Path, layout: str) -> tuple[str, str]:
    import ray
    from ray import serve

    from cluster import serve_env
    from deployments.app import make_app
    from moe_parallel.parallel.launch import free_port

    with serve_env.applied():  # the cluster as `make serve` starts it
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(model), "served_model_name": "bench", "layout": layout, "max_model_len": 1024,
            "max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_blocks": 512, "cpus_per_worker": 0.5}
    serve.run(make_app(args, {"num_replicas": 1, "max_ongoing_requests": 128}), name="bench", route_prefix="/")
    return serve_env.api_url(f"http://127.0.0.1:{port}"), "bench"  # the ingress replica's own port, as shipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server; default: start one")
    ap.add_argument("--served-model", default=None, help="model name at --url")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint to serve (default: bench-214m)")
    ap.add_argument("--layout", default="disaggregated")
    ap.add_argument("--compare", default=None, metavar="LAYOUT",
                    help="also serve the same app with this layout (e.g. single), one after the other, and add "
                         "the tok/s ratio per concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = _serve_and_sweep(args, args.layout)
    note = (f"HTTP streaming completions, layout `{args.layout}`, prompt {args.prompt_len} tokens, "
            f"{args.output_len} generated per request, {args.requests_per_client} requests per client.")
    table = render(rows, note)
    if args.compare and args.url is None:
        other = _serve_and_sweep(args, args.compare)
        table += "\n" + render(other, f"The same app with layout `{args.compare}`, right after:") + "\n"
        table += "\n".join([f"| concurrency | `{args.layout}` tok/s | `{args.compare}` tok/s | ratio |",
                            "| ---: | ---: | ---: | ---: |"] + [
            f"| {a['concurrency']} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f}x |"
            for a, b in zip(rows, other, strict=True)]) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_load.md").write_text(table)
    return 0


def _serve_and_sweep(args, layout: str) -> list[dict]:
    started = args.url is None
    if started:
        from bench.models import bench_model

        url, model = start_app(args.model or bench_model(), layout)
    else:
        url = args.url.rstrip("/")
        model = args.served_model or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    try:
        asyncio.run(sweep_level(url, model, 1, 1, args.prompt_len, 4))  # warm-up
        return [asyncio.run(sweep_level(url, model, c, c * args.requests_per_client, args.prompt_len,
                                        args.output_len)) for c in args.concurrency]
    finally:
        if started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
