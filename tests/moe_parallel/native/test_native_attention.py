"""The native fused decode attention (torch.ops.moe_serve.decode_attention, csrc/attention.cpp)
against a plain torch reference (gather K/V through the slots, masked softmax in float32): every
ISA this CPU runs (AVX2 and the scalar fallback forced on an AVX-512 machine stand in for CPUs
without it), float32 and bfloat16, GQA ratios 8/2, 4/4, 8/1 and one with more than 16 query heads
per KV head, head dims 16 to 128 and one off the vector width, context lengths 1 to ~3,000 mixed
in one batch (padding slots anywhere, slot 0 included), sliding windows, and the shape checks.

Skipped when the library is not built; a failure in CI, where the Makefile builds it first."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import native
from tests.moe_parallel.native_support import require_library

require_library()

ISAS = native.supported_isas()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (B, H, G, Dh, longest context, window)
CASES = [(1, 8, 2, 64, 3000, 0), (1, 8, 2, 64, 1, 0), (3, 4, 4, 16, 2500, 0), (3, 8, 1, 128, 1200, 300),
         (17, 8, 2, 128, 900, 0), (17, 4, 4, 64, 400, 64), (2, 40, 2, 24, 700, 1), (5, 8, 2, 40, 300, 0)]


def reference(q, k_cache, v_cache, ctx_slots, q_pos, window, scale):
    b, h, d = q.shape
    g, length = k_cache.shape[1], ctx_slots.shape[1]
    k, v = k_cache[ctx_slots].float(), v_cache[ctx_slots].float()  # [B, L, G, Dh]
    scores = torch.einsum("bgrd,blgd->bgrl", q.float().view(b, g, h // g, d), k) * scale
    j = torch.arange(length)
    allowed = j[None] <= q_pos[:, None]
    if window:
        allowed &= q_pos[:, None] - j[None] < window
    probs = scores.masked_fill(~allowed[:, None, None], float("-inf")).softmax(-1)
    return torch.einsum("bgrl,blgd->bgrd", probs, v).reshape(b, h, d)


def problem(b, h, g, d, longest, dtype, seed=0, slots=4096):
    """q, one layer's cache and ctx_slots for rows of mixed lengths (the first one `longest`);
    the slots past each row's query point anywhere, slot 0 included."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, g, d, generator=gen).to(dtype)
    v = torch.randn(slots, g, d, generator=gen).to(dtype)
    q = (torch.randn(b, h, d, generator=gen) * 2).to(dtype)
    lens = torch.randint(1, longest + 1, (b,), generator=gen)
    lens[0] = longest
    ctx_slots = torch.stack([torch.randperm(slots, generator=gen)[:longest] for _ in range(b)])
    pad = torch.arange(longest)[None] >= lens[:, None]
    ctx_slots[pad] = torch.where(torch.rand(int(pad.sum()), generator=gen) < 0.5, 0,
                                 torch.randint(0, slots, (int(pad.sum()),), generator=gen))
    return q, k, v, ctx_slots, lens - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-H{c[1]}G{c[2]}-D{c[3]}-L{c[4]}-W{c[5]}" for c in CASES])
def test_matches_reference(isa, case, dtype):
    b, h, g, d, longest, window = case
    q, k, v, ctx_slots, q_pos = problem(b, h, g, d, longest, dtype, seed=sum(case))
    out = native.decode_attention(q, k, v, ctx_slots, q_pos, window, d**-0.5)
    assert out.dtype == dtype and out.shape == (b, h, d)
    want = reference(q, k, v, ctx_slots, q_pos, window, d**-0.5)
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype] if dtype == torch.bfloat16 else 0)


def test_one_thread_and_defaults(isa):
    """One thread (no split of the context across threads) and the wrapper's defaults (no window,
    scale Dh**-0.5) give the same result."""
    q, k, v, ctx_slots, q_pos = problem(2, 8, 2, 64, 2000, torch.float32, seed=3)
    want = reference(q, k, v, ctx_slots, q_pos, 0, 64**-0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = native.decode_attention(q, k, v, ctx_slots, q_pos)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(native.decode_attention(q, k, v, ctx_slots, q_pos, None), want, atol=1e-5, rtol=0)


def test_switch_forces_isa():
    for name in ISAS:
        native.force(name)
        try:
            assert native.isa() == name
            q, k, v, ctx_slots, q_pos = problem(1, 8, 2, 64, 50, torch.bfloat16, seed=1)
            got = native.decode_attention(q, k, v, ctx_slots, q_pos, 0, 0.125)
            torch.testing.assert_close(got.float(), reference(q, k, v, ctx_slots, q_pos, 0, 0.125), atol=2e-2,
                                       rtol=2e-2)
        finally:
            native.force(None)


def test_empty_batch():
    q, k, v, _, _ = problem(1, 8, 2, 64, 4, torch.float32)
    out = native.decode_attention(q[:0], k, v, torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 8, 64)


def test_errors():
    q, k, v, ctx_slots, q_pos = problem(2, 8, 2, 64, 16, torch.float32)
    op = native.decode_attention
    with pytest.raises(RuntimeError, match=r"q must be \[B, H, Dh\]"):
        op(q[0], k, v, ctx_slots, q_pos)
    with pytest.raises(RuntimeError, match=r"one layer's \[S, G, Dh\]"):
        op(q, k[None], v[None], ctx_slots, q_pos)
    with pytest.raises(RuntimeError, match="k_cache and v_cache must both be"):
        op(q, k, v[:10], ctx_slots, q_pos)
    with pytest.raises(RuntimeError, match="tensors like q"):
        op(q, k.bfloat16(), v.bfloat16(), ctx_slots, q_pos)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, ctx_slots, q_pos)
    with pytest.raises(RuntimeError, match="head dim 64 differs"):
        op(q, k[..., :32].contiguous(), v[..., :32].contiguous(), ctx_slots, q_pos)
    with pytest.raises(RuntimeError, match="multiple of the KV heads G = 3"):
        op(q, torch.zeros(8, 3, 64), torch.zeros(8, 3, 64), ctx_slots, q_pos)
    with pytest.raises(RuntimeError, match=r"ctx_slots must be a CPU int64 \[B, L\]"):
        op(q, k, v, ctx_slots.int(), q_pos)
    with pytest.raises(RuntimeError, match=r"ctx_slots must be a CPU int64 \[B, L\]"):
        op(q, k, v, ctx_slots[:1], q_pos)
    with pytest.raises(RuntimeError, match=r"q_pos must be a CPU int64 \[B\]"):
        op(q, k, v, ctx_slots, q_pos[:, None])
    with pytest.raises(RuntimeError, match=r"q_pos\[1\] = 16 is outside \[0, L - 1 = 15\]"):
        op(q, k, v, ctx_slots, torch.tensor([3, 16]))
    with pytest.raises(RuntimeError, match=r"q_pos\[0\] = -1"):
        op(q, k, v, ctx_slots, torch.tensor([-1, 3]))
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        op(q, k, v, ctx_slots, q_pos, -1)
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        op(q.double(), k.double(), v.double(), ctx_slots, q_pos)
    bad = ctx_slots.clone()
    bad[1, 2] = k.shape[0]
    with pytest.raises(RuntimeError, match=r"ctx_slots\[1, 2\] = 4096 is outside the cache's slots \[0, S = 4096\)"):
        op(q, k, v, bad, torch.tensor([3, 5]))
    op(q, k, v, bad, torch.tensor([3, 1]))  # past q_pos: padding, never read
