"""Paged KV cache tensors of one attention rank.

The cache is a pool of `num_blocks` blocks of `block_size` token slots per layer; a
sequence's block table (kept by whoever schedules it) maps its positions to slots:
slot = block_table[pos // block_size] * block_size + pos % block_size (`slots_of`).

Shapes: k, v [layers, S + 1, G, Dh] with S = num_blocks * block_size slots, G KV heads; the
last slot is scratch: padding rows of a padded decode step (`decode.py`) write there.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = num_blocks * block_size
        self.scratch_slot = slots
        # zeros, not empty: padded attention reads unwritten slots with zero weight, and 0 * NaN
        # from uninitialised memory would still be NaN
        shape, device = (num_layers, slots + 1, kv_heads, head_dim), torch.device(device)
        if device.type == "cpu":
            check_memory(2 * math.prod(shape) * dtype.itemsize)
        self.k = zeros(shape, dtype, device)
        self.v = zeros(shape, dtype, device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` [B, L] -> [B, L, G, Dh] each (index_select: faster than fancy indexing)."""
        flat = slots.flatten()
        shape = (*slots.shape, *self.k.shape[2:])
        return self.k[layer].index_select(0, flat).view(shape), self.v[layer].index_select(0, flat).view(shape)


def slots_of(tables: torch.Tensor, rows: torch.Tensor | slice, positions: torch.Tensor,
             block_size: int) -> torch.Tensor:
    """The KV slots of `positions` in the sequences `rows` of block tables [B, NB] (broadcast;
    `slice(None)` and positions [L]: every sequence's [B, L])."""
    return tables[rows, positions // block_size] * block_size + positions % block_size


ALIGN = 64


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU from calloc (numpy's zeros): the kernel's zero pages, touched
    as the cache fills, where torch.zeros writes the whole pool at start-up (a 1 GiB pool:
    0.3 s of both cores, and all of it resident from the first step)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape) * dtype.itemsize
    raw = np.zeros(n + ALIGN, dtype=np.uint8)  # calloc's block starts 16 bytes past a page
    at = -raw.ctypes.data % ALIGN  # rows start on a cache line, as torch's own allocations do
    return torch.from_numpy(raw[at:at + n]).view(dtype).view(shape)


def available_bytes() -> int | None:
    """The host's available memory (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(need: int) -> None:
    """A CPU pool comes from calloc and is only touched as it fills (`zeros`), so one the host
    cannot hold would fail mid-serving: it is refused here, at start-up, instead."""
    have = available_bytes()
    if have is not None and need > have:
        raise MemoryError(f"the KV cache needs {need / 2**30:.2f} GiB and this host has {have / 2**30:.2f} GiB "
                          "available; lower kv_cache_memory_gib or kv_cache_blocks")
