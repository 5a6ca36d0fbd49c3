"""A batch-1 decode step of `single` against the weight-read bound, and where its time goes.

    python -m bench.decode_bound [--dtypes float32 bfloat16] [--steps 64]

A decode step at batch 1 must read every weight it uses once: the attention projections, the
router gates, the K experts each layer routes the token to, and the lm_head (not the
embedding table: one row). The bound is those bytes over the read bandwidth measured in the
same run, just before; the table gives the step's time, the bytes it read and the fraction of
the bandwidth that makes, and the step's profile (sections of `moe_parallel.runtime.profile`, which
add up to the step: the rest is the Python between them).
"""

from __future__ import annotations

import argparse

import torch

from bench.ceiling import read_bandwidth
from bench.models import bench_model
from bench.steps import decode_run
from moe_parallel.loading.loader import build_single
from moe_parallel.model.config import ModelConfig
from moe_parallel.runtime import compute, profile
from moe_parallel.step.cache_size import CacheSpec


def step_bytes(c: ModelConfig, dtype: torch.dtype) -> int:
    """Weights one batch-1 decode step reads (each layer's K experts, no embedding table)."""
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = d * (q + 2 * kv) + q * d + d * c.num_experts + c.experts_per_token * 3 * d * c.intermediate_size
    return (c.num_layers * per_layer + c.vocab_size * d) * dtype.itemsize


def measure(dtype_name: str, steps: int) -> tuple[list, dict]:
    path = bench_model()
    c, dtype = ModelConfig.from_dir(path), getattr(torch, dtype_name)
    runner = build_single(path, dtype, cache=CacheSpec(num_blocks=256), max_model_len=256)

    def run(on_timed=lambda: None) -> float:
        return decode_run(lambda bs: [runner.execute(b) for b in bs], 1, 32, steps, on_timed=on_timed)

    compute.run(run)  # warm-up
    bw = compute.run(read_bandwidth)  # on the compute thread: a second OpenMP team slows every step
    seconds = compute.run(run)
    profile.enable(True)
    profiled = compute.run(run, profile.reset)
    sections = {k: v / steps for k, (v, _) in profile.report().items()}
    profile.enable(False)
    sections["(rest: Python between sections)"] = profiled - sum(sections.values())
    sections["(the profiled step)"] = profiled
    moved = step_bytes(c, dtype)
    return [dtype_name, f"{seconds * 1e3:.2f}", f"{moved / 1e6:.0f}", f"{moved / seconds / 1e9:.1f}", f"{bw / 1e9:.1f}",
            f"{moved / seconds / bw:.0%}"], sections


def run(dtypes: list[str], steps: int = 64) -> str:
    rows, profiles = [], {}
    for name in dtypes:
        row, sections = measure(name, steps)
        rows.append(row)
        profiles[name] = sections
    lines = ["| dtype | step ms | MB of weights read | GB/s | read bandwidth GB/s | of the bound |",
             "| --- | ---: | ---: | ---: | ---: | ---: |", *("| " + " | ".join(r) + " |" for r in rows), "",
             "ms per step by section, in a profiled run of the same steps (top-level sections: they do not nest):",
             "",
             "| section | " + " | ".join(profiles) + " |", "| --- |" + " ---: |" * len(profiles)]
    names = sorted({k for p in profiles.values() for k in p},
                   key=lambda k: -max(p.get(k, 0) for p in profiles.values()))
    lines += [f"| {k} | " + " | ".join(f"{profiles[d].get(k, 0) * 1e3:.3f}" for d in profiles) + " |" for k in names]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args(argv)
    print(run(args.dtypes, args.steps))


if __name__ == "__main__":
    main()
