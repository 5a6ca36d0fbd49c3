"""Prefix caching on a shared-prefix workload: TTFT and tok/s with caching on and off, one run.

    python -m bench.prefix [--concurrency 32] [--prefix 1024] [--suffix 64] [--new-tokens 32]

bench-214m, `single` in process. Every request is a common `--prefix`-token prompt (a system
prompt, few-shot examples) followed by its own `--suffix` tokens; one request with the prefix
goes first (with caching, it fills the cache), then `--concurrency` requests arrive at once and
make `--new-tokens` greedy tokens each. Reports TTFT p50 of those requests and their tok/s,
caching on against off (bench/results/prefix.md).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

from bench.models import bench_model
from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec

RESULTS = Path(__file__).resolve().parent / "results"


async def serve(engine, prefix: list[int], suffixes: list[list[int]], new_tokens: int) -> tuple[float, float]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    async for _ in engine.generate("warm", prefix + [5, 6], params):
        pass

    async def one(i: int, suffix: list[int]) -> tuple[float, int]:
        start, first, n = time.perf_counter(), None, 0
        async for o in engine.generate(f"r{i}", prefix + suffix, params):
            first = first or time.perf_counter() - start
            n += len(o.token_ids)
        return first, n

    start = time.perf_counter()
    results = await asyncio.gather(*[one(i, s) for i, s in enumerate(suffixes)])
    elapsed = time.perf_counter() - start
    return statistics.median(r[0] for r in results), sum(r[1] for r in results) / elapsed


def run(concurrency: int, prefix_len: int, suffix_len: int, new_tokens: int) -> str:
    base = bench_model()
    rng = random.Random(0)
    prefix = [1] + [rng.randrange(3, 32000) for _ in range(prefix_len - 1)]
    suffixes = [[rng.randrange(3, 32000) for _ in range(suffix_len)] for _ in range(concurrency)]
    max_len = prefix_len + suffix_len + new_tokens
    blocks = (concurrency + 2) * (-(-max_len // 16))
    runner = build_single(base, cache=CacheSpec(num_blocks=blocks, block_size=16), max_model_len=max_len)
    rows = {}
    for caching in (False, True, False, True):  # twice each, alternating; the better of the two
        config = EngineConfig(max_model_len=max_len, max_num_seqs=64, max_num_batched_tokens=2048,
                              enable_prefix_caching=caching)
        ttft, rate = asyncio.run(serve(make_engine(InProcessExecutor(runner), base, config), prefix, suffixes,
                                       new_tokens))
        old = rows.get(caching)
        rows[caching] = (ttft, rate) if old is None else (min(old[0], ttft), max(old[1], rate))
    off, on = rows[False], rows[True]
    lines = [f"{concurrency} concurrent requests: a common {prefix_len}-token prefix, {suffix_len}-token suffixes, "
             f"{new_tokens} new tokens each (greedy), bench-214m, `single` in process.", "",
             "| prefix caching | TTFT p50 (s) | tok/s |", "| --- | ---: | ---: |",
             f"| off | {off[0]:.2f} | {off[1]:.1f} |", f"| on | {on[0]:.2f} | {on[1]:.1f} |",
             f"| on / off | {on[0] / off[0]:.2f}x | {on[1] / off[1]:.2f}x |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    text = run(args.concurrency, args.prefix, args.suffix, args.new_tokens)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
