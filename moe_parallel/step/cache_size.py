"""How many KV blocks an attention rank gets: given, or sized from the memory it has.

    explicit   num_blocks                        (`kv_cache_blocks` in the app args)
    CPU        memory_gib of KV (`kv_cache_memory_gib`, default 1 GiB)
    GPU        gpu_memory_utilization x the card, minus what the rank already uses and the
               peak of the dummy steps (a prefill at `max_num_batched_tokens`, a decode at the
               largest batch bucket, and the CUDA graph pool when decode runs as graphs), as
               vLLM measures it; `memory_gib` is a CPU setting and does not apply here

The dummy prefill runs on every device at start-up, after the expert ranks of the instance
serve (it goes through the experts like any step): on a GPU it measures, on a CPU it warms up
and proves the path before the first request. A CPU has no allocator statistics to measure
with, so its pool is the budget it is given.

Whatever the source, a rank whose pool cannot hold one sequence of `max_model_len` tokens is
refused when it starts, with both numbers (`CacheTooSmall`): serving it would refuse every
request that asks for the whole context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_parallel.model.config import ModelConfig

GIB = 1024**3
DEFAULT_CPU_KV_GIB = 1.0


class CacheTooSmall(ValueError):
    """The KV pool cannot hold one sequence of the longest allowed length."""


@dataclass(frozen=True)
class CacheSpec:
    num_blocks: int | None = None
    block_size: int = 16
    memory_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 512  # the size of the dummy step that measures the GPU's peak

    def __post_init__(self):
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"kv_cache_blocks must be at least 1 (got {self.num_blocks})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})")


def bytes_per_block(c: ModelConfig, dtype: torch.dtype, block_size: int) -> int:
    return c.kv_bytes_per_token(dtype.itemsize) * block_size


def blocks_for_budget(spec: CacheSpec, c: ModelConfig, dtype: torch.dtype, budget_bytes: float) -> int:
    return max(0, int(budget_bytes // bytes_per_block(c, dtype, spec.block_size)))


def cpu_blocks(spec: CacheSpec, c: ModelConfig, dtype: torch.dtype) -> int:
    """The pool of a CPU worker: also what the app's arguments can refuse before any worker starts."""
    if spec.num_blocks is not None:
        return spec.num_blocks
    return blocks_for_budget(spec, c, dtype, (spec.memory_gib or DEFAULT_CPU_KV_GIB) * GIB)


def kv_blocks(spec: CacheSpec, c: ModelConfig, dtype: torch.dtype, device: torch.device,
              peak_step: Callable[[], int]) -> int:
    """The pool size for a rank on `device`; `peak_step()` runs the dummy steps and returns the
    device's peak allocated bytes over them (a CPU's reading is not used)."""
    if device.type != "cuda":
        peak_step()
        return cpu_blocks(spec, c, dtype)
    if spec.num_blocks is not None:
        return spec.num_blocks
    torch.cuda.reset_peak_memory_stats(device)
    peak = peak_step()
    free, total = torch.cuda.mem_get_info(device)
    # memory that torch's allocator does not see (CUDA context, communication buffers, other
    # processes on the card) counts against the budget too
    outside = (total - free) - torch.cuda.memory_reserved(device)
    return blocks_for_budget(spec, c, dtype, total * spec.gpu_memory_utilization - peak - max(outside, 0))


def check_fits(num_blocks: int, block_size: int, max_model_len: int) -> None:
    if num_blocks * block_size < max_model_len:
        raise CacheTooSmall(f"the KV cache holds {num_blocks * block_size} tokens per attention worker "
                            f"({num_blocks} blocks of {block_size}), fewer than one sequence of max_model_len="
                            f"{max_model_len}; lower max_model_len or give the KV cache more memory "
                            "(kv_cache_blocks, kv_cache_memory_gib or gpu_memory_utilization)")

