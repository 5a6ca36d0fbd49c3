"""The native fused MoE kernels (moe_parallel/native, csrc/) against per-expert F.linear loops in
float64: every ISA this CPU runs (AVX2 and the scalar fallback forced on an AVX-512 machine stand
in for CPUs without it), float32 and bfloat16, odd sizes, empty experts, 1 to 1,000+ rows, ids
outside the local range, the per-row variant, the MOE_SERVE_KERNELS switch and the shape checks.

Skipped when the library is not built; a failure in CI, where the Makefile builds it first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moe_parallel import native
from tests.moe_parallel.native_support import require_library

require_library()

ISAS = native.supported_isas()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (tokens, experts, k, hidden, intermediate): bench shape, E=4/K=1, E=6/K=3 with D, F off the
# 16/32 tiles, 1,040 rows with an odd F, an odd D (the bfloat16 pair tail), D = F = 1
SHAPES = [(1, 8, 2, 512, 1792), (7, 4, 1, 64, 96), (33, 6, 3, 40, 72), (520, 8, 2, 48, 33), (3, 5, 2, 37, 50),
          (2, 1, 1, 1, 1)]


def make_weights(experts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def routing(tokens, experts, k, seed=0, pool=None):
    """topk ids without repeats per token (from `pool` when given) and renormalised weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(experts) if pool is None else torch.tensor(pool)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(tokens)]) if tokens else \
        torch.empty(0, k, dtype=torch.int64)
    w = torch.rand(tokens, k, generator=g) + 0.1
    return ids, w / w.sum(-1, keepdim=True)


def swiglu(x, w13, w2):
    f = w2.shape[-1]
    return F.linear(F.silu(F.linear(x, w13[:f])) * F.linear(x, w13[f:]), w2)


def reference(x, ids, weights, w13, w2, first_expert=0):
    """sum_k w[t, k] * SwiGLU_e(x[t]) over experts e in [first, first + X), float64, expert by expert."""
    x64, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(w13.shape[0]):
        t, k = torch.nonzero(ids == first_expert + e, as_tuple=True)
        if t.numel():
            out.index_add_(0, t, weights[t, k, None].double() * swiglu(x64[t], w13[e], w2[e]))
    return out


def check(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-K{}-D{}-F{}".format(*s))
def test_fused_moe_matches_the_loop(isa, dtype, shape):
    tokens, experts, k, hidden, inter = shape
    w13, w2 = make_weights(experts, hidden, inter, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids, wts = routing(tokens, experts, k)
    out = native.fused_moe(x, ids, wts, native.prepack(w13, gated=True), native.prepack(w2), 0, experts, inter)
    check(out, reference(x, ids, wts, w13, w2), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_experts_and_ids_outside_the_local_range(isa, dtype):
    """An expert rank holding experts 2..4 of 8; tokens route to {0, 2, 4, 7} only, so expert 3
    gets no rows and ids 0 and 7 contribute nothing; int32 ids as well as int64."""
    w13, w2 = make_weights(3, 64, 80, dtype)
    x = torch.randn(40, 64).to(dtype)
    ids, wts = routing(40, 8, 2, pool=[0, 2, 4, 7])
    p13, p2 = native.prepack(w13, gated=True), native.prepack(w2)
    expected = reference(x, ids, wts, w13, w2, first_expert=2)
    check(native.fused_moe(x, ids, wts, p13, p2, 2, 3, 80), expected, dtype)
    check(native.fused_moe(x, ids.int(), wts, p13, p2, 2, 3, 80), expected, dtype)
    none = native.fused_moe(x, torch.full_like(ids, 7), wts, p13, p2, 2, 3, 80)
    assert torch.equal(none, torch.zeros_like(none))


# (gate_rows, down_rows, row_block, blocks_per_task, k_slice, slice_max_tiles, prefetch,
# stream_prefetch): one-row tiles, row blocks of 7, odd-length K slices with prefetch; 3 blocks per
# task, no slicing; the defaults
TUNINGS = [(1, 1, 7, 1, 17, 64, True, 0), (3, 5, 40, 3, 0, 4, False, 1024), None]


@pytest.fixture(params=TUNINGS, ids=["tiny-tiles", "no-slices", "defaults"])
def tuning(request):
    default = {k: v for k, v in native.tuning().items() if not k.startswith("max_")}
    if request.param:
        native.set_tuning(*request.param)
    yield request.param
    native.set_tuning(**default)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_tiles_row_blocks_and_k_slices(isa, tuning, dtype):
    """Many rows per expert (several row tiles and row blocks, K cut in slices), odd D and F."""
    w13, w2 = make_weights(4, 75, 90, dtype)
    x = torch.randn(150, 75, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids, wts = routing(150, 4, 2)
    out = native.fused_moe(x, ids, wts, native.prepack(w13, gated=True), native.prepack(w2), 0, 4, 90)
    check(out, reference(x, ids, wts, w13, w2), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 9, 1100])
def test_rows_variant_keeps_arrival_order(isa, dtype, rows):
    w13, w2 = make_weights(4, 48, 40, dtype)
    x = torch.randn(rows, 48).to(dtype)
    ids = torch.randint(0, 3, (rows,), generator=torch.Generator().manual_seed(rows))  # expert 3 gets none
    y = native.fused_experts_rows(x, ids, native.prepack(w13, gated=True), native.prepack(w2), 40)
    expected = torch.zeros(rows, 48, dtype=torch.float64)
    for e in range(4):
        mask = ids == e
        expected[mask] = swiglu(x[mask].double(), w13[e].double(), w2[e].double())
    assert y.shape == (rows, 48)
    check(y, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_isa_gives_the_same_result(dtype):
    w13, w2 = make_weights(8, 512, 1792, dtype)
    x = torch.randn(24, 512).to(dtype)
    ids, wts = routing(24, 8, 2)
    outs = {}
    try:
        for name in ISAS:
            native.force(name)  # packed for each: the float32 layout is the ISA's (kernels.h)
            p13, p2 = native.prepack(w13, gated=True), native.prepack(w2)
            outs[name] = native.fused_moe(x, ids, wts, p13, p2, 0, 8, 1792).double()
    finally:
        native.force(None)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: h may round one ulp apart
    for name, out in outs.items():
        torch.testing.assert_close(out, outs[ISAS[0]], atol=tol, rtol=tol, msg=f"{name} vs {ISAS[0]}")


def test_non_contiguous_x_and_per_expert_packing():
    w13, w2 = make_weights(3, 40, 72, torch.float32)
    base = torch.randn(40, 10)
    x = base.T  # [10, 40], not contiguous
    ids, wts = routing(10, 3, 2)
    p13 = torch.empty(native.packed_shape(3, 144, 40, True, torch.float32))
    for e in range(3):  # expert by expert, as a streaming loader would
        p13[e] = native.prepack(w13[e], gated=True)
    assert torch.equal(p13, native.prepack(w13, gated=True))
    out = native.fused_moe(x, ids, wts, p13, native.prepack(w2), 0, 3, 72)
    check(out, reference(x.contiguous(), ids, wts, w13, w2), torch.float32)
    assert native.fused_moe(x[:0], ids[:0], wts[:0], p13, native.prepack(w2), 0, 3, 72).shape == (0, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_blocks_are_the_halves_packed_side_by_side(dtype, isa):
    """The layout contract loaders rely on, for every ISA's layout: packing w1 and w3 alone (plain)
    and putting them in the gate and up columns of each gated block (`native.gate_up`'s views) is
    the same as packing w13 gated."""
    w13, _ = make_weights(2, 37, 45, dtype)
    gated = native.prepack(w13, gated=True)
    gate, up = native.gate_up(gated)
    torch.testing.assert_close(gate, native.prepack(w13[:, :45]), rtol=0, atol=0)
    torch.testing.assert_close(up, native.prepack(w13[:, 45:]), rtol=0, atol=0)
    assert gated.shape == native.packed_shape(2, 90, 37, True, dtype)
    if dtype == torch.float32:
        assert gated.shape[2:] == ((2, 37, 32) if native.halves(dtype) else (37, 64))
    else:
        assert gated.shape[2:] == ((2, 19, 32, 2) if native.halves(dtype) else (19, 64, 2))


@pytest.mark.skipif("avx2" not in native.supported_isas(), reason="needs a CPU with AVX2")
def test_float32_halves_layout_and_weights_of_another_layout_are_refused():
    """AVX2 packs float32 blocks in halves (csrc/kernels.h): block b, half h, k-row kk holds gate
    then up columns 16h..16h + 15. Weights packed for one layout and run under another are a
    shape error, never a wrong product."""
    w13, w2 = make_weights(1, 3, 40, torch.float32)
    x, (ids, wts) = torch.randn(4, 3), routing(4, 1, 1)
    native.force("avx2")
    try:
        assert native.halves(torch.float32) and native.halves(torch.bfloat16)
        p13, p2 = native.prepack(w13, gated=True), native.prepack(w2)
        assert p13.shape == (1, 2, 2, 3, 32) and p2.shape == (1, 1, 2, 40, 16)
        for b, h, kk in ((0, 0, 0), (0, 1, 2), (1, 0, 1)):
            cols = [32 * b + 16 * h + c for c in range(16)]
            live = [c for c in cols if c < 40]
            torch.testing.assert_close(p13[0, b, h, kk, :len(live)], w13[0, live, kk], rtol=0, atol=0)
            torch.testing.assert_close(p13[0, b, h, kk, 16:16 + len(live)], w13[0, [40 + c for c in live], kk],
                                       rtol=0, atol=0)
            assert not p13[0, b, h, kk, len(live):16].any()  # columns past F are zeros
        check(native.fused_moe(x, ids, wts, p13, p2, 0, 1, 40), reference(x, ids, wts, w13, w2), torch.float32)
        native.force("generic")
        assert not native.halves(torch.float32)
        with pytest.raises(RuntimeError, match=r"w13_packed has shape \[1, 2, 2, 3, 32\], expected \[1, 2, 3, 64\]"):
            native.fused_moe(x, ids, wts, p13, p2, 0, 1, 40)
    finally:
        native.force(None)


def test_shape_and_dtype_checks_say_what_is_wrong():
    w13, w2 = make_weights(2, 32, 64, torch.float32)
    p13, p2 = native.prepack(w13, gated=True), native.prepack(w2)
    x = torch.randn(4, 32)
    ids, wts = routing(4, 2, 1)
    with pytest.raises(RuntimeError, match="gated=True"):
        native.fused_moe(x, ids, wts, native.prepack(w13), p2, 0, 2, 64)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.fused_moe(x.double(), ids, wts, p13, p2, 0, 2, 64)
    with pytest.raises(RuntimeError, match="like x"):
        native.fused_moe(x.bfloat16(), ids, wts, p13, p2, 0, 2, 64)
    with pytest.raises(RuntimeError, match="topk_weights"):
        native.fused_moe(x, ids, wts[:, :0], p13, p2, 0, 2, 64)
    with pytest.raises(RuntimeError, match="num_local_experts"):
        native.fused_moe(x, ids, wts, p13, p2, 0, 3, 64)
    with pytest.raises(RuntimeError, match="outside"):
        native.fused_experts_rows(x, torch.tensor([0, 1, 2, 0]), p13, p2, 64)


def test_torch_setting_turns_the_kernels_off():
    try:
        native.force("torch")
        assert not native.available() and native.isa() == "torch" and "torch" in native.reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            native.prepack(torch.randn(1, 64, 32))
    finally:
        native.force(None)


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2")
def test_env_variable_selects_the_path():
    """MOE_SERVE_KERNELS=avx2 at start-up, then =torch re-read: one fresh interpreter for both."""
    code = ("import os; from moe_parallel import native; print(native.isa(), native.available()); "
            "os.environ['MOE_SERVE_KERNELS'] = 'torch'; native.force(None); print(native.isa(), native.available())")
    env = os.environ | {"MOE_SERVE_KERNELS": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["avx2", "True", "torch", "False"], out.stderr[-2000:]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif(not {"amx_bf16", "amx_tile"} <= _cpu_flags(), reason="this CPU has no AMX-BF16")
def test_a_cpu_with_amx_takes_the_amx_tiles_for_bfloat16():
    """On an AMX machine the automatic pick is the AMX table, and its bfloat16 products (16-row
    tiles from 4 rows per expert, the AVX-512 BF16 kernel below) match the float64 loop."""
    assert ISAS[0] == "amx_bf16"
    out = subprocess.run([sys.executable, "-c", "from moe_parallel import native; print(native.isa())"],
                         capture_output=True, text=True, env=os.environ | {"MOE_SERVE_KERNELS": "auto"})
    assert out.stdout.strip() == "amx_bf16", out.stderr[-2000:]
    native.force("amx_bf16")
    try:
        w13, w2 = make_weights(8, 512, 1792, torch.bfloat16)
        p13, p2 = native.prepack(w13, gated=True), native.prepack(w2)
        for tokens in (1, 2, 16, 64, 300):  # rows per expert below and above the tile threshold
            x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
            ids, wts = routing(tokens, 8, 2, seed=tokens)
            check(native.fused_moe(x, ids, wts, p13, p2, 0, 8, 1792), reference(x, ids, wts, w13, w2), torch.bfloat16)
    finally:
        native.force(None)
