"""LoRA adapters in the batch: tok/s at 32 streams with 0, 1 and 4 distinct adapters.

    python -m bench.lora [--concurrency 32] [--rank 16]

bench-214m, `single` in process; four random rank-16 adapters on q/k/v/o made with `peft`
(bench/.models/lora-*). Every run serves `--concurrency` greedy requests of 32-token prompts
and 64 new tokens; with k adapters, the requests are spread evenly over them (k = 0: the base
model). Reports tok/s and the ratio to the base model from the same run (bench/results/lora.md).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.engine_throughput import prompts
from bench.models import BENCH_DIR, bench_model
from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec

RESULTS = Path(__file__).resolve().parent / "results"


def adapter(base: Path, i: int, rank: int) -> Path:
    path = BENCH_DIR / f"lora-{i}-r{rank}"
    if not (path / "adapter_config.json").exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import MixtralForCausalLM

        torch.manual_seed(i)
        model = MixtralForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(str(path))
    return path


async def serve(engine, loras: list, concurrency: int, new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    async def one(i, prompt):
        n = 0
        lora = loras[i % len(loras)] if loras else None
        async for o in engine.generate(f"r{time.monotonic_ns()}-{i}", prompt, params, lora):
            n += len(o.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts(concurrency, 32))])
    return sum(counts) / (time.perf_counter() - start)


def run(concurrency: int, rank: int, new_tokens: int) -> str:
    base = bench_model()
    paths = [(f"lora-{i}", str(adapter(base, i, rank))) for i in range(4)]
    runner = build_single(base, cache=CacheSpec(num_blocks=1024, block_size=16), max_model_len=1024, lora=(4, rank))
    config = EngineConfig(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=2048, max_loras=4)
    rates = {}
    asyncio.run(serve(make_engine(InProcessExecutor(runner), base, config), paths, 4, 4))  # warm-up, load all
    for k in (0, 1, 4):  # an engine belongs to one event loop: a fresh one per run
        rates[k] = max(asyncio.run(serve(make_engine(InProcessExecutor(runner), base, config), paths[:k], concurrency,
                                         new_tokens)) for _ in range(2))
    lines = [f"{concurrency} concurrent requests (32-token prompts, {new_tokens} new tokens, greedy), bench-214m, "
             f"`single` in process; adapters of rank {rank} on q/k/v/o.", "",
             "| distinct adapters in the batch | tok/s | vs base model |", "| ---: | ---: | ---: |"]
    lines += [f"| {k} | {rates[k]:.1f} | {rates[k] / rates[0]:.2f}x |" for k in (0, 1, 4)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    text = run(args.concurrency, args.rank, args.new_tokens)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
