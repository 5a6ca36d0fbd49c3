"""The CPU KV pool: zeros from calloc, resident only as it fills, refused up front when the
host cannot hold it."""

from __future__ import annotations

import pytest
import torch

from moe_parallel.model import kv_cache
from moe_parallel.model.kv_cache import KVCache


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_cpu_pool_is_zero_and_resident_only_where_written():
    before = _rss()
    # 2 x 4 layers x 16,385 slots x 8 heads x 128 x 4 bytes: 512 MiB, none of it touched yet
    cache = KVCache(4, 1024, 16, 8, 128, torch.float32, torch.device("cpu"))
    assert cache.k.shape == (4, 1024 * 16 + 1, 8, 128) and cache.k.dtype == torch.float32
    assert cache.k.data_ptr() % 64 == 0 and cache.v.data_ptr() % 64 == 0  # rows on cache lines
    assert _rss() - before < 64 << 20, "the pool was written at start-up"
    rows = torch.arange(0, 1024 * 16 + 1, 997)
    assert not cache.k[:, rows].any() and not cache.v[:, rows].any()  # reads are zeros
    k = torch.ones(3, 8, 128)
    cache.write(1, torch.tensor([5, 6, 16384]), k, 2 * k)
    assert torch.equal(cache.k[1, 5], k[0]) and torch.equal(cache.v[1, 16384], 2 * k[2])
    assert not cache.k[0, 5].any() and not cache.k[1, 7].any()


def test_bfloat16_pool_from_calloc():
    cache = KVCache(2, 4, 8, 2, 16, torch.bfloat16, torch.device("cpu"))
    assert cache.k.dtype == torch.bfloat16 and cache.v.shape == (2, 33, 2, 16) and not cache.k.any()


def test_a_pool_larger_than_the_host_is_refused_at_start(monkeypatch):
    monkeypatch.setattr(kv_cache, "available_bytes", lambda: 1 << 30)
    with pytest.raises(MemoryError, match="needs 2.00 GiB and this host has 1.00 GiB"):
        KVCache(4, 4096, 16, 8, 128, torch.float32, torch.device("cpu"))  # 2 x 1 GiB


def test_available_memory_is_read_on_linux():
    have = kv_cache.available_bytes()
    assert have is not None and have > 0
