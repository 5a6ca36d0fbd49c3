"""The native fused RoPE + KV-cache write (torch.ops.moe_serve.rotary_cache_write, csrc/rotary.cpp)
against the torch path of Attention.forward (split qkv, rope.apply_rotary on q and k, index_copy_
of k and v into one layer's cache): every ISA this CPU runs, float32 (bit for bit: no fused
multiply-add) and bfloat16 (rounded once instead of three times: within ~1 ulp), T from 1 to
700 (the parallel path), GQA 8/2, 4/4, 32/8, 8/1 and a head dim off the vector width; the returned
q, the written rows, every other row untouched; the error messages.

Skipped when the library is not built; a failure in CI, where the Makefile builds it first."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import native
from moe_parallel.model.layers import Rotary, apply_rotary
from tests.moe_parallel.native_support import require_library

require_library()

ISAS = native.supported_isas()
# (atol, rtol): float32 is also checked bit for bit, bfloat16 within ~1 ulp (2^-7 relative) of randn values
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (2e-2, 1.6e-2)}
SHAPES = [(8, 2, 64), (4, 4, 16), (32, 8, 128), (8, 1, 24)]


def problem(t, h, g, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = max(2 * t, 64)
    qkv = torch.randn(t, (h + 2 * g) * d, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (t,), generator=gen)
    cos, sin = Rotary(d, 1e6, torch.device("cpu")).cos_sin(positions, dtype)
    k_cache = torch.randn(s, g, d, generator=gen).to(dtype)
    v_cache = torch.randn(s, g, d, generator=gen).to(dtype)
    slots = torch.randperm(s, generator=gen)[:t]
    return qkv, cos, sin, k_cache, v_cache, slots


def reference(qkv, h, g, cos, sin, k_cache, v_cache, slots):
    d = k_cache.shape[-1]
    q, k, v = qkv.split([h * d, g * d, g * d], dim=-1)
    t = qkv.shape[0]
    q, k, v = q.view(t, h, d), k.view(t, g, d), v.view(t, g, d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,g,d", SHAPES)
@pytest.mark.parametrize("t", [1, 3, 40, 700])
def test_matches_torch(isa, t, h, g, d, dtype):
    qkv, cos, sin, k_cache, v_cache, slots = problem(t, h, g, d, dtype, seed=t + d)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = reference(qkv, h, g, cos, sin, k_ref, v_ref, slots)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = native.rotary_cache_write(qkv, h, g, cos, sin, k_cache, v_cache, slots)
    assert q.shape == (t, h, d) and q.dtype == dtype and q.is_contiguous()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(q.float(), q_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(k_cache[slots].float(), k_ref[slots].float(), atol=atol, rtol=rtol)
    if dtype == torch.float32:  # the same products and adds, no fused multiply-add (csrc/rope_impl.h)
        assert torch.equal(q, q_ref) and torch.equal(k_cache[slots], k_ref[slots])
    assert torch.equal(v_cache[slots], v_ref[slots])  # a copy: exact
    others = torch.ones(k_cache.shape[0], dtype=torch.bool)
    others[slots] = False
    assert torch.equal(k_cache[others], k_before[others]) and torch.equal(v_cache[others], v_before[others])


def test_errors():
    qkv, cos, sin, k_cache, v_cache, slots = problem(3, 8, 2, 64, torch.float32)
    call = native.rotary_cache_write
    bad = slots.clone()
    bad[1] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match=r"slots\[1\] = 64 is outside the cache's slots \[0, S = 64\)"):
        call(qkv, 8, 2, cos, sin, k_cache, v_cache, bad)
    bad[1] = -1
    with pytest.raises(RuntimeError, match=r"slots\[1\] = -1 is outside"):
        call(qkv, 8, 2, cos, sin, k_cache, v_cache, bad)
    with pytest.raises(RuntimeError, match=r"qkv must be \[T, \(H \+ 2G\) \* Dh\]"):
        call(qkv, 4, 2, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="KV heads"):
        call(qkv, 8, 1, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        call(qkv, 8, 2, cos[:2], sin, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="cos and sin must be CPU"):
        call(qkv, 8, 2, cos.bfloat16(), sin, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="k_cache and v_cache must be CPU"):
        call(qkv, 8, 2, cos, sin, k_cache.bfloat16(), v_cache.bfloat16(), slots)
    with pytest.raises(RuntimeError, match="k_cache and v_cache must both be"):
        call(qkv, 8, 2, cos, sin, k_cache, v_cache[:10], slots)
    with pytest.raises(RuntimeError, match="slots must be a CPU int64"):
        call(qkv, 8, 2, cos, sin, k_cache, v_cache, slots.int())
    with pytest.raises(RuntimeError, match="qkv must be contiguous"):
        call(qkv.t().contiguous().t(), 8, 2, cos, sin, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        call(qkv.half(), 8, 2, cos, sin, k_cache, v_cache, slots)
