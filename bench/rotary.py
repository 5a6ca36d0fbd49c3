"""Microseconds per call of RoPE + the KV-cache write at decode/prefill sizes: the torch path of
Attention.forward (split qkv, two rope.apply_rotary, two index_copy_) against the fused native op
(torch.ops.moe_serve.rotary_cache_write), float32 and bfloat16, one markdown table.

    python -m bench.rotary [--heads 8 --kv-heads 2 --head-dim 64] [--tokens 1 16 256] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from moe_parallel import native
from moe_parallel.model.layers import Rotary, apply_rotary


def torch_path(qkv, h, g, cos, sin, k_cache, v_cache, slots):
    d = k_cache.shape[-1]
    t = qkv.shape[0]
    q, k, v = qkv.split([h * d, g * d, g * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, g, d), v.view(t, g, d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)
    return q


def per_call_us(fn, budget_s: float = 0.15) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end:  # best of short batches: robust to a busy machine
        n = 50
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.reason()}")
    h, g, d = args.heads, args.kv_heads, args.head_dim
    rotary = Rotary(d, 1e6, torch.device("cpu"))
    print(f"H={h} G={g} Dh={d}, isa={native.isa()}, threads={torch.get_num_threads()}\n")
    print("| dtype | T | torch path (us) | fused op (us) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for t in args.tokens:
            slots_total = 4096
            qkv = torch.randn(t, (h + 2 * g) * d).to(dtype)
            cos, sin = rotary.cos_sin(torch.arange(t) + 100, dtype)
            k_cache = torch.zeros(slots_total, g, d, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            slots = torch.randperm(slots_total)[:t]
            call = (qkv, h, g, cos, sin, k_cache, v_cache, slots)
            ref = per_call_us(partial(torch_path, *call))
            op = per_call_us(partial(native.rotary_cache_write, *call))
            name = "fp32" if dtype == torch.float32 else "bf16"
            print(f"| {name} | {t} | {ref:.1f} | {op:.1f} | {ref / op:.1f}x |")


if __name__ == "__main__":
    main()
