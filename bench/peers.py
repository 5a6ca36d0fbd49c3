"""This project against vLLM's CPU build on the same machine, model, prompts and client, in one run.

    make bench-peers                   # sets up .venv-peers (vLLM's CPU build), then runs this
    python -m bench.peers [--concurrency 1 8 32 64] [--http-concurrency 1 8 32] [--skip-http | --skip-offline]

Offline: vLLM's `LLM.generate` (bench/vllm_offline.py, in vLLM's own virtualenv) against this
project's in-process `single` engine (bench.engine_throughput's measurement), each in a fresh
process, one after the other: bench-214m in float32 and in bfloat16 (vLLM's CPU default),
prompts of 32 random tokens, 64 generated tokens each, greedy, EOS ignored, best of 2 after a
warm-up at the same shapes. `python -m bench.moe_kernels` under .venv-peers/bin/python compares
the MoE layer itself against vLLM's `cpu_fused_moe`.
Over HTTP: `vllm serve` and `serve run`'s app (`disaggregated`, as shipped) driven by the same
client (bench.http_load), one after the other. vLLM's CPU settings: VLLM_CPU_KVCACHE_SPACE=4
(GiB) and VLLM_CPU_OMP_THREADS_BIND over every core. Prints ratios (ours / vLLM) and writes
bench/results/peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.http_load import render as http_render
from bench.http_load import start_app, sweep_level
from bench.models import bench_model

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RESULTS = Path(__file__).resolve().parent / "results"


def vllm_env() -> dict:
    cores = os.cpu_count() or 1
    return os.environ | {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}


def vllm_offline(model: Path, batches: list[int], prompt_len: int, output_len: int,
                 dtype: str = "float32") -> dict[int, float]:
    cmd = [str(PEERS_PYTHON), str(ROOT / "bench" / "vllm_offline.py"), str(model), "--batches", *map(str, batches),
           "--prompt-len", str(prompt_len), "--output-len", str(output_len), "--dtype", dtype]
    out = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=3600)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"vLLM offline run failed:\n{out.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(line).items()}


def ours_offline(model: Path, batches: list[int], prompt_len: int, output_len: int,
                 dtype: str = "float32") -> dict[int, float]:
    cmd = [sys.executable, "-m", "bench.engine_throughput", "--side", "engine", "--model", str(model),
           "--concurrency", *map(str, batches), "--prompt-len", str(prompt_len), "--output-len", str(output_len),
           "--dtype", dtype]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"engine run failed:\n{out.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def vllm_http(model: Path, levels: list[int], prompt_len: int, output_len: int) -> list[dict]:
    port = 8765
    cmd = [str(PEERS_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype",
           "float32", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
           "--served-model-name", "bench", "--max-num-seqs", "64"]
    server = subprocess.Popen(cmd, env=vllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, server)
        return _sweep(url, levels, prompt_len, output_len)
    finally:
        server.terminate()
        server.wait(timeout=60)


def ours_http(model: Path, levels: list[int], prompt_len: int, output_len: int) -> list[dict]:
    import ray
    from ray import serve

    url, _ = start_app(model, "disaggregated")
    try:
        return _sweep(url, levels, prompt_len, output_len)
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("vllm serve did not come up")


def _sweep(url: str, levels: list[int], prompt_len: int, output_len: int) -> list[dict]:
    import asyncio

    asyncio.run(sweep_level(url, "bench", 1, 1, prompt_len, 4))  # warm-up
    return [asyncio.run(sweep_level(url, "bench", c, 2 * c, prompt_len, output_len)) for c in levels]


def render(offline: dict[str, tuple[dict, dict]], http: tuple[list, list] | None, args) -> str:
    lines = [f"bench-214m, prompts of {args.prompt_len} tokens, {args.output_len} generated, greedy; "
             "same machine, same run."]
    if offline:
        lines += ["", "Offline (in process), output tok/s:", "",
                  "| dtype | concurrency | this project (`single`) | vLLM CPU `LLM.generate` | ours / vLLM |",
                  "| --- | ---: | ---: | ---: | ---: |"]
    for dtype, (vllm, ours) in offline.items():
        lines += [f"| {dtype} | {b} | {ours[b]:.1f} | {vllm[b]:.1f} | {ours[b] / vllm[b]:.2f}x |"
                  for b in args.concurrency]
    if http is not None:
        theirs, mine = http
        lines += ["", "Over HTTP (streaming completions, the same client, float32):", "",
                  "| streams | ours tok/s | vLLM tok/s | tok/s ratio | ours TTFT p50 (ms) | vLLM TTFT p50 (ms) | "
                  "TTFT ratio | ours ITL p50 (ms) | vLLM ITL p50 (ms) | ITL ratio |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for a, b in zip(mine, theirs, strict=True):
            lines.append(f"| {a['concurrency']} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | "
                         f"{a['tok_s'] / b['tok_s']:.2f}x | {a['ttft_p50'] * 1e3:.0f} | {b['ttft_p50'] * 1e3:.0f} | "
                         f"{a['ttft_p50'] / b['ttft_p50']:.2f}x | {a['itl_p50'] * 1e3:.1f} | "
                         f"{b['itl_p50'] * 1e3:.1f} | {a['itl_p50'] / b['itl_p50']:.2f}x |")
        lines += ["", http_render(mine, "This project over HTTP:"), http_render(theirs, "vLLM over HTTP:")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--http-concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-offline", action="store_true", help="only the HTTP comparison")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="offline comparison dtypes (vLLM's CPU default is bfloat16)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not PEERS_PYTHON.exists():
        print("error: .venv-peers is missing; run `make bench-peers` (it installs vLLM's CPU build)", file=sys.stderr)
        return 2
    model = bench_model()
    offline = {} if args.skip_offline else {
        dtype: (vllm_offline(model, args.concurrency, args.prompt_len, args.output_len, dtype),
                ours_offline(model, args.concurrency, args.prompt_len, args.output_len, dtype))
        for dtype in args.dtypes}
    http = None
    if not args.skip_http:
        http = (vllm_http(model, args.http_concurrency, args.prompt_len, args.output_len),
                ours_http(model, args.http_concurrency, args.prompt_len, args.output_len))
    text = render(offline, http, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("peers_http.md" if args.skip_offline else "peers.md")).write_text(text)  # keep the offline table
    from bench import plots

    plots.main(["--results", str(args.out)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
