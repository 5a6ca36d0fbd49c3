"""The machine's own limits, measured in the same run as everything they are compared with.

Memory read bandwidth: summing a tensor much larger than the caches. Matrix-multiply rate: a
large float32 GEMM. A decode step at batch 1 cannot beat reading the active weights once; a
large batch cannot beat doing its FLOPs at the GEMM rate.
"""

from __future__ import annotations

import time

import torch


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    return x.numel() * 4 / _best(lambda: x.sum(), repeats)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Float32 FLOP per second."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best(lambda: a @ b, repeats)
