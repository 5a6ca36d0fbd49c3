"""The float experts' grouped path (`torch._grouped_mm`, offsets on the device) against the
per-expert loop it replaces, and against each expert's SwiGLU written out: experts with no
rows, no rows at all, every float dtype on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_parallel.model.experts import Experts, FloatExperts


def swiglu(x, w13, w2):
    gate, up = (x @ w13.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 7, 40])
def test_grouped_equals_the_loop_and_the_formula(dtype, rows):
    torch.manual_seed(rows)
    experts, hidden, inter = 6, 32, 48
    w13 = torch.randn(experts, 2 * inter, hidden) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter) / inter**0.5
    group = FloatExperts(w13.to(dtype), w2.to(dtype), first_expert=0)
    x = torch.randn(rows, hidden).to(dtype)
    ids = torch.randint(0, 3, (rows,))  # experts 3..5 get no rows
    assert group._grouped_ok(x)
    with torch.inference_mode():
        grouped = group(x, ids)
        loop = Experts._compute(group, x, ids)
    expected = torch.stack([swiglu(x[i:i + 1].float(), w13[e].to(dtype).float(), w2[e].to(dtype).float())[0]
                            for i, e in enumerate(ids.tolist())]) if rows else torch.empty(0, hidden)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(grouped.float(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(grouped.float(), loop.float(), atol=tol, rtol=tol)
    assert grouped.shape == (rows, hidden) and grouped.dtype == dtype


def test_unaligned_rows_keep_the_loop():
    group = FloatExperts(torch.randn(2, 12, 6), torch.randn(2, 6, 6), first_expert=0)  # 24-byte rows
    x = torch.randn(4, 6)
    assert not group._grouped_ok(x)
    torch.testing.assert_close(group(x, torch.tensor([0, 1, 1, 0])), Experts._compute(
        group, x, torch.tensor([0, 1, 1, 0])))
