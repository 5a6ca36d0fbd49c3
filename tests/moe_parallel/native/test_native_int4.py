"""The native int4 weight-only experts (csrc/moe.cpp `run_quant` with `Q4Layer`, the AVX-512 and AVX2 int4
products) against per-expert products in float64 over the weights the codes stand for, (q - zero) * scale per
group: every ISA this CPU runs that has int4 products (the others refuse int4 weights with a
clear error), float32 and bfloat16 activations, both ways a task runs (codes dequantized in
registers, or its block dequantized for the float kernels), sizes off the 32-column tile, groups
of 16 to 128, symmetric and asymmetric, empty experts, 1 to 1,000+ rows, the rows variant, the
nibble layout, the loader's experts against torch's int4 path, and the checks on codes and scales.

Skipped when the library is not built; a failure in CI, where the Makefile builds it first."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import native
from moe_parallel.model.quant import QuantConfig, dequantize, quantize
from tests.moe_parallel.native.test_native_moe import reference, routing, swiglu
from tests.moe_parallel.native_support import require_library

require_library()

# float32: the exact dequantized product up to float32 sums (and one rounding of the bias);
# bfloat16: activations and h rounded, and the dequantized blocks rounded to bfloat16
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
# (tokens, experts, k, hidden, intermediate, group): bench shape; E=4/K=1; E=6/K=3 with D and F off
# the 32-column tile; 1,040 rows; one block each way
SHAPES = [(1, 8, 2, 512, 1792, 128), (7, 4, 1, 64, 96, 32), (33, 6, 3, 48, 80, 16), (520, 8, 2, 64, 48, 16),
          (3, 5, 2, 32, 32, 32)]


def int4_weights(experts, rows, cols, group, symmetric=False, seed=0):
    """Random codes in [-8, 7], scales and zero points per (row, group) of [X, rows, cols], and the
    weights they stand for."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (experts, rows, cols), generator=g, dtype=torch.int8)
    scale = (torch.rand(experts, rows, cols // group, generator=g) + 0.5) / (8 * cols**0.5)
    zero = None if symmetric else torch.randint(-8, 8, scale.shape, generator=g, dtype=torch.int8)
    z = 0 if zero is None else zero.double().repeat_interleave(group, -1)
    return codes, scale, zero, (codes.double() - z) * scale.double().repeat_interleave(group, -1)


def packed(hidden, inter, experts, group, symmetric=False):
    c13, s13, z13, w13 = int4_weights(experts, 2 * inter, hidden, group, symmetric)
    c2, s2, z2, w2 = int4_weights(experts, hidden, inter, group, symmetric, seed=1)
    return (native.prepack_q4(c13, gated=True), native.prepack_q4(c2),
            {"w13_scale": native.prepack_q4_scales(s13, z13, gated=True), "w2_scale": native.prepack_q4_scales(s2, z2)},
            w13, w2)


def _int4_isas() -> list[str]:
    """The ISAs this CPU runs that have int4 products of their own."""
    out = []
    try:
        for isa in native.supported_isas():
            native.force(isa)
            if native.has_q4():
                out.append(isa)
    finally:
        native.force(None)
    return out


@pytest.fixture(params=_int4_isas() or [pytest.param(None, marks=pytest.mark.skip(reason="no ISA with int4 products"))])
def q4_isa(request):
    """Each ISA with int4 products, forced, then back to the MOE_SERVE_KERNELS choice."""
    native.force(request.param)
    yield request.param
    native.force(None)


@pytest.fixture(params=[(0, 0), (1 << 20, 0), (1 << 20, 3)], ids=["dequantized-blocks", "codes-in-registers",
                                                                   "registers-3-row-tiles"])
def q4_path(request):
    default = {k: v for k, v in native.tuning().items() if not k.startswith("max_")}
    rows, tile = request.param
    native.set_tuning(**{**default, "q4_dequant_rows": rows, "gate_rows": tile, "down_rows": tile})
    yield request.param
    native.set_tuning(**default)


def check(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-K{}-D{}-F{}-G{}".format(*s))
def test_int4_fused_moe_matches_the_dequantized_loop(q4_isa, q4_path, dtype, shape):
    tokens, experts, k, hidden, inter, group = shape
    p13, p2, scales, w13, w2 = packed(hidden, inter, experts, group, symmetric=tokens == 7)
    assert p13.dtype == torch.uint8 and p13.shape == native.q4_packed_shape(experts, 2 * inter, hidden, True)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids, wts = routing(tokens, experts, k)
    out = native.fused_moe(x, ids, wts, p13, p2, 0, experts, inter, **scales)
    check(out, reference(x, ids, wts, w13, w2), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_empty_experts_ids_outside_the_range_and_the_rows_variant(q4_isa, q4_path, dtype):
    """Experts 2..4 of 8 held here, tokens routed to {0, 2, 4, 7} (expert 3 gets none); then one
    output per routed row in arrival order, 0, 1, 9 and 1,100 rows."""
    p13, p2, scales, w13, w2 = packed(64, 80, 3, 16)
    x = torch.randn(40, 64).to(dtype)
    ids, wts = routing(40, 8, 2, pool=[0, 2, 4, 7])
    check(native.fused_moe(x, ids, wts, p13, p2, 2, 3, 80, **scales),
          reference(x, ids, wts, w13, w2, first_expert=2), dtype)
    for rows in (0, 1, 9, 1100):
        xr = torch.randn(rows, 64).to(dtype)
        local = torch.randint(0, 2, (rows,), generator=torch.Generator().manual_seed(rows))  # expert 2: no rows
        y = native.fused_experts_rows(xr, local, p13, p2, 80, **scales)
        want = torch.zeros(rows, 64, dtype=torch.float64)
        for e in range(3):
            m = local == e
            want[m] = swiglu(xr[m].double(), w13[e], w2[e])
        check(y, want, dtype)


def test_the_default_int4_crossover_is_the_kernel_sets_own(q4_isa):
    """q4_dequant_rows -1 (the default) takes the running kernels' crossover (kernels_avx2.cpp,
    kernels_avx512.cpp): AVX2 dequantizes bfloat16 tasks above 20 rows an expert, AVX-512 above 12.
    The default's output is bit for bit the forced path's: one expert, 16 rows, bfloat16 activations
    (their dequantized blocks round the weights to bfloat16, so the paths differ; with float32
    activations the AVX2 paths agree to the bit and the crossover there is a matter of speed)."""
    dtype = torch.bfloat16
    p13, p2, scales, _, _ = packed(64, 80, 1, 16)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    local = torch.zeros(16, dtype=torch.long)
    default = {k: v for k, v in native.tuning().items() if not k.startswith("max_")}
    assert default["q4_dequant_rows"] == -1
    outs = {}
    try:
        for rows in (-1, 0, 1 << 20):
            native.set_tuning(**{**default, "q4_dequant_rows": rows})
            outs[rows] = native.fused_experts_rows(x, local, p13, p2, 80, **scales)
    finally:
        native.set_tuning(**default)
    assert not torch.equal(outs[0], outs[1 << 20])  # the two paths round apart: the check can tell
    own = {"avx2": 20}.get(q4_isa, 12)
    assert torch.equal(outs[-1], outs[1 << 20] if 16 <= own else outs[0])


def test_nibble_and_scale_layout():
    """Plain blocks: per k-row 16 bytes, byte j = column j (low nibble) | column j + 16 (high), codes
    offset by 8, zeros past N; gated: the w1 half's 16 bytes, then w3's. Scales then biases
    -(8 + zero) * scale per group and column, zero past N."""
    codes = torch.randint(-8, 8, (40, 4), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    p = native.prepack_q4(codes)
    assert p.shape == native.q4_packed_shape(1, 40, 4, False)[1:] == (2, 4, 16)
    u = (codes.int() + 8).T  # [K, N]
    assert torch.equal(p[0].int(), u[:, :16] | (u[:, 16:32] << 4))
    assert torch.equal(p[1, :, :8].int(), u[:, 32:40]) and not p[1, :, 8:].any()
    gated = native.prepack_q4(torch.cat([codes, -codes.clamp(min=-7)]), gated=True)  # w1 [40, 4] over w3
    assert gated.shape == (2, 4, 32)
    assert torch.equal(gated[:, :, :16], p) and torch.equal(gated[:, :, 16:], native.prepack_q4(-codes.clamp(min=-7)))
    s = torch.rand(40, 2) + 0.1
    z = torch.randint(-8, 8, (40, 2), dtype=torch.int8)
    sb = native.prepack_q4_scales(s, z)
    assert sb.shape == native.q4_scale_shape(1, 40, 2, False)[1:] == (2, 2, 2, 32)
    assert torch.equal(sb[0, :, 0], s[:32].T) and torch.equal(sb[1, :, 0, :8], s[32:].T)
    torch.testing.assert_close(sb[0, :, 1], (-(8 + z[:32].float()) * s[:32]).T)
    assert not sb[1, :, :, 8:].any()
    assert torch.equal(native.prepack_q4_scales(s)[..., 1, :], -8 * native.prepack_q4_scales(s)[..., 0, :])


def test_int4_calls_check_their_codes_and_scales(q4_isa):
    p13, p2, scales, _, _ = packed(32, 32, 2, 16)
    x, ids, wts = torch.randn(3, 32), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1)
    with pytest.raises(RuntimeError, match=r"int4 codes must lie in \[-8, 7\], got \[-9, 3\]"):
        native.prepack_q4(torch.tensor([[-9, 3]], dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int4 packed weights need w13_scale and w2_scale"):
        native.fused_moe(x, ids, wts, p13, p2, 0, 2, 32)
    with pytest.raises(RuntimeError, match="w2_scale must be a contiguous CPU float32 tensor of shape"):
        native.fused_moe(x, ids, wts, p13, p2, 0, 2, 32, w13_scale=scales["w13_scale"],
                         w2_scale=scales["w2_scale"][:, :, :, 0].contiguous())
    other = packed(32, 32, 2, 32)[2]["w2_scale"]  # groups of 32 for w2, 16 for w13
    with pytest.raises(RuntimeError, match="int4 groups must be even and the same for w13 and w2, got 16 and 32"):
        native.fused_moe(x, ids, wts, p13, p2, 0, 2, 32, w13_scale=scales["w13_scale"], w2_scale=other)
    with pytest.raises(RuntimeError, match="w2_packed .int4 codes. must be a contiguous CPU uint8 tensor"):
        native.fused_moe(x, ids, wts, p13, p2[..., :8].contiguous(), 0, 2, 32, **scales)


def test_isas_without_int4_products_refuse_int4_weights():
    p13, p2, scales, _, _ = packed(32, 32, 2, 16)
    try:
        native.force("generic")
        assert not native.has_q4()
        with pytest.raises(RuntimeError, match="the generic kernels have no int4 products"):
            native.fused_moe(torch.randn(2, 32), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), p13, p2,
                             0, 2, 32, **scales)
    finally:
        native.force(None)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_loaded_int4_experts_compute_what_torch_int4_experts_compute(tiny_ckpt, symmetric):
    """The tiny model's layer-0 experts loaded as native int4 (the loader's choice where the ISA
    has int4 products) and on torch's int4 kernels (MOE_SERVE_KERNELS=torch's path): the same codes,
    so the same products up to torch's bfloat16 activations and scales."""
    from moe_parallel.loading.loader import load_experts, open_checkpoint
    from moe_parallel.model.config import ModelConfig
    from moe_parallel.model.experts import QuantExperts
    from moe_parallel.model.packed import PackedExperts

    if not native.has_q4():
        pytest.skip(f"{native.isa()} has no int4 products")
    c = ModelConfig.from_dir(tiny_ckpt)
    quant = QuantConfig("int4", group_size=32, symmetric=symmetric)
    ours = load_experts(open_checkpoint(tiny_ckpt), c, torch.float32, torch.device("cpu"), range(c.num_experts),
                        quant)[0]
    try:
        native.force("torch")
        theirs = load_experts(open_checkpoint(tiny_ckpt), c, torch.float32, torch.device("cpu"),
                              range(c.num_experts), quant)[0]
        floats = load_experts(open_checkpoint(tiny_ckpt), c, torch.float32, torch.device("cpu"),
                              range(c.num_experts))[0]
    finally:
        native.force(None)
    assert isinstance(ours, PackedExperts) and isinstance(theirs, QuantExperts)
    weights = c.num_experts * 3 * c.hidden_size * c.intermediate_size  # half a byte each, 8 bytes a group of 32
    assert ours.nbytes == weights // 2 + weights // 32 * 8
    x = torch.randn(50, c.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, c.num_experts, (50,), generator=torch.Generator().manual_seed(4))
    a, b = ours(x, ids), theirs(x, ids)
    assert (a - b).abs().max() < 0.02 * b.abs().max()
    # and exactly (to float32 sums) the quantization of the checkpoint's float experts
    f = c.intermediate_size
    for e in ids[:4].tolist():
        w13, w2 = floats.w13[e].float(), floats.w2[e].float()
        w1, w3, w2 = (dequantize(quantize(m, quant)) for m in (w13[:f], w13[f:], w2))
        xe = x[ids == e]
        want = (torch.nn.functional.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T
        torch.testing.assert_close(a[ids == e], want, atol=1e-5, rtol=1e-5)
