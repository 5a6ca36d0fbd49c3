"""Output tokens/s of the engine against transformers `generate`, same model, same prompts, one run.

    python -m bench.engine_throughput [--concurrency 1 8 32 64] [--skip-ray]

Every request has the same prompt length and generates exactly `--output-len` tokens
(EOS ignored), so both sides do the same work. Each side runs in a fresh process of its own
(one after the other, never at the same time), so neither inherits the other's memory or
thread pools. transformers runs `generate` on a batch of
that many prompts (greedy); the engine gets that many concurrent requests (greedy,
continuous batching, `single` layout in this process). The `disaggregated` layout
(1 attention actor + 2 expert actors on Ray, over gloo) runs the same load at one
concurrency and is reported as a ratio to `single`. Writes a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.models import bench_model
from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec

RESULTS = Path(__file__).resolve().parent / "results"


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 32000, (length - 1,), generator=g).tolist()] for _ in range(n)]


def best_of(repeats: int, measure) -> float:
    """The best of a few runs: a shared machine only ever makes a run slower, never faster."""
    return max(measure() for _ in range(repeats))


def hf_generate(model, batch: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(batch) * new_tokens / elapsed


async def engine_run(engine, batch: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    async def one(i, p):
        n = 0
        async for o in engine.generate(f"b{time.monotonic_ns()}-{i}", p, params):
            n += len(o.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(i, p) for i, p in enumerate(batch)])
    elapsed = time.perf_counter() - start
    assert sum(counts) == len(batch) * new_tokens
    return sum(counts) / elapsed


def engine_config(max_len: int) -> EngineConfig:
    return EngineConfig(max_model_len=max_len, max_num_seqs=64, max_num_batched_tokens=2048)


def measure_single(path: Path, levels: list[int], prompt_len: int, new_tokens: int,
                   repeats: int, dtype: str = "float32") -> dict[int, float]:
    runner = build_single(path, dtype, cache=CacheSpec(num_blocks=512, block_size=16),
                          max_model_len=prompt_len + new_tokens)

    def once(c: int) -> float:
        engine = make_engine(InProcessExecutor(runner), path, engine_config(prompt_len + new_tokens))
        return asyncio.run(engine_run(engine, prompts(c, prompt_len), new_tokens))

    once(1)  # warm-up
    return {c: best_of(repeats, lambda c=c: once(c)) for c in levels}


def measure_ray(path: Path, levels: list[int], prompt_len: int, new_tokens: int,
                exchanges: list[str]) -> dict[str, dict[int, float]]:
    """The engine in this process driving a `disaggregated` instance of Ray actors (A=1, N=2, one
    thread each), once per exchange: {exchange: {concurrency: tok/s}}."""
    import ray

    from cluster.instance import RayExecutor, RayInstance, Resources
    from moe_parallel.parallel.workers import InstanceSpec

    ray.init(num_cpus=3, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        for exchange in exchanges:
            spec = InstanceSpec(str(path), "disaggregated", 1, 2, cache=CacheSpec(num_blocks=512, block_size=16),
                                max_model_len=prompt_len + new_tokens, exchange=exchange)
            inst = RayInstance(spec, Resources(num_cpus=1.0))
            try:
                engine = make_engine(RayExecutor(inst), path, engine_config(prompt_len + new_tokens))
                asyncio.run(engine_run(engine, prompts(1, prompt_len), 8))  # warm-up
                out[exchange] = {}
                for c in levels:
                    engine = make_engine(RayExecutor(inst), path, engine_config(prompt_len + new_tokens))
                    out[exchange][c] = asyncio.run(engine_run(engine, prompts(c, prompt_len), new_tokens))
            finally:
                inst.shutdown()
    finally:
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--ray-concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--exchanges", nargs="+", default=["shm", "gloo"], choices=["shm", "gloo"])
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement; the best is kept")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: bench-214m)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the engine's dtype")
    ap.add_argument("--side", choices=["hf", "engine", "ray"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    path = args.model or bench_model()
    if args.side:
        print(json.dumps(measure_side(args, path)))
        return 0
    hf_rates = _in_subprocess(argv, "hf")
    ours = _in_subprocess(argv, "engine")
    ray_rate = None if args.skip_ray else _in_subprocess(argv, "ray")
    table = render(args, hf_rates, ours, ray_rate)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_throughput.md").write_text(table)
    plot(hf_rates, ours, args.out / "engine_throughput.png")
    return 0


def measure_side(args, path: Path) -> dict:
    if args.side == "hf":
        from transformers import MixtralForCausalLM

        hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        hf_generate(hf, prompts(1, args.prompt_len), 4)  # warm-up
        return {b: best_of(args.repeats, lambda b=b: hf_generate(hf, prompts(b, args.prompt_len), args.output_len))
                for b in args.hf_batches}
    if args.side == "engine":
        return measure_single(path, args.concurrency, args.prompt_len, args.output_len, args.repeats, args.dtype)
    return measure_ray(path, args.ray_concurrency, args.prompt_len, args.output_len, args.exchanges)


def _in_subprocess(argv: list[str] | None, side: str) -> dict:
    cmd = [sys.executable, "-m", "bench.engine_throughput", *(argv if argv is not None else sys.argv[1:]),
           "--side", side]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    return {int(k) if k.isdigit() else k: ({int(c): r for c, r in v.items()} if isinstance(v, dict) else v)
            for k, v in raw.items()}


def render(args, hf: dict[int, float], ours: dict[int, float], ray_rate: dict[str, dict[int, float]] | None) -> str:
    ref8 = hf.get(8)
    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}, "
        f"torch {torch.__version__}. Prompt {args.prompt_len} tokens, {args.output_len} generated, greedy, float32, "
        f"best of {args.repeats} runs.",
        "",
        "| concurrency | engine (single) tok/s | transformers generate tok/s (same batch) | engine / transformers |"
        + (" engine / transformers@8 |" if ref8 else ""),
        "| ---: | ---: | ---: | ---: |" + (" ---: |" if ref8 else ""),
    ]
    for c in args.concurrency:
        h = hf.get(c)
        row = f"| {c} | {ours[c]:.1f} | {h:.1f} | {ours[c] / h:.2f}x |" if h else f"| {c} | {ours[c]:.1f} | - | - |"
        lines.append(row + (f" {ours[c] / ref8:.2f}x |" if ref8 else ""))
    if ray_rate:
        lines += ["", "`disaggregated` (A=1, N=2 Ray actors, one thread each), the engine in this process, same "
                  "prompts, against `single` above:", "",
                  "| exchange | " + " | ".join(f"tok/s at {c} | vs single at {c}" for c in args.ray_concurrency) + " |",
                  "| --- | " + " | ".join("---: | ---:" for _ in args.ray_concurrency) + " |"]
        for exchange, rates in ray_rate.items():
            cells = [f"{rates[c]:.1f} | {rates[c] / ours[c]:.2f}x" if c in ours else f"{rates[c]:.1f} | -"
                     for c in args.ray_concurrency]
            lines.append(f"| {exchange} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(hf: dict[int, float], ours: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(ours), list(ours.values()), "o-", label="engine (single layout)")
    ax.plot(list(hf), list(hf.values()), "s--", label="transformers generate")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sequences (batch)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("bench-214m, float32, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
