"""The native int8 weight-only experts (csrc/moe.cpp `run_quant` with `Q8Layer`, the AVX-512, AVX2 and generic
int8 products) against per-expert products in float64 over the dequantized weights: every ISA this CPU
runs (ISAs without int8 products of their own run the generic ones), float32 and bfloat16
activations, both ways a task runs (codes converted in registers, or its block dequantized for
the float kernels), odd sizes, empty experts, 1 to 1,000+ rows, the rows variant, the loader's
choice and the checks on the scales.

Skipped when the library is not built; a failure in CI, where the Makefile builds it first."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import native
from moe_parallel.model.quant import QuantConfig, dequantize, quantize
from tests.moe_parallel.native.test_native_moe import SHAPES, reference, routing, swiglu
from tests.moe_parallel.native_support import require_library

require_library()

INT8 = QuantConfig("int8")
# float32: the exact dequantized product up to float32 sums; bfloat16: activations and h rounded,
# and the dequantized blocks rounded to bfloat16 on the dequantizing path
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def quantized_weights(experts, hidden, inter, seed=0):
    """int8 codes and float32 scales per output row of random w13 [X, 2F, D] and w2 [X, D, F] (the
    project's quantization, compressed-tensors' math), and the weights they stand for."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in ((2 * inter, hidden), (hidden, inter)):
        qs = [quantize(torch.randn(rows, cols, generator=g) / cols**0.5, INT8) for _ in range(experts)]
        codes = torch.stack([q.codes for q in qs])
        scale = torch.stack([q.scale[:, 0].float() for q in qs])
        out.append((codes, scale, torch.stack([dequantize(q) for q in qs])))
    return out


def packed(weights):
    (c13, s13, _), (c2, s2, _) = weights
    return (native.prepack(c13, gated=True), native.prepack(c2),
            {"w13_scale": native.prepack_scales(s13, gated=True), "w2_scale": native.prepack_scales(s2)})


@pytest.fixture(params=[0, 1 << 20], ids=["dequantized-blocks", "codes-in-registers"])
def q8_path(request):
    default = {k: v for k, v in native.tuning().items() if not k.startswith("max_")}
    native.set_tuning(**{**default, "q8_dequant_rows": request.param})
    yield request.param
    native.set_tuning(**default)


def check(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-K{}-D{}-F{}".format(*s))
def test_int8_fused_moe_matches_the_dequantized_loop(isa, q8_path, dtype, shape):
    tokens, experts, k, hidden, inter = shape
    weights = quantized_weights(experts, hidden, inter)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids, wts = routing(tokens, experts, k)
    p13, p2, scales = packed(weights)
    assert p13.dtype == torch.int8 and p13.shape == native.packed_shape(experts, 2 * inter, hidden, True, torch.int8)
    out = native.fused_moe(x, ids, wts, p13, p2, 0, experts, inter, **scales)
    check(out, reference(x, ids, wts, weights[0][2], weights[1][2]), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_empty_experts_ids_outside_the_range_and_the_rows_variant(isa, q8_path, dtype):
    """Experts 2..4 of 8 held here, tokens routed to {0, 2, 4, 7} (expert 3 gets none); then one
    output per routed row in arrival order, 0, 1, 9 and 1,100 rows."""
    weights = quantized_weights(3, 64, 80)
    p13, p2, scales = packed(weights)
    x = torch.randn(40, 64).to(dtype)
    ids, wts = routing(40, 8, 2, pool=[0, 2, 4, 7])
    expected = reference(x, ids, wts, weights[0][2], weights[1][2], first_expert=2)
    check(native.fused_moe(x, ids, wts, p13, p2, 2, 3, 80, **scales), expected, dtype)
    for rows in (0, 1, 9, 1100):
        xr = torch.randn(rows, 64).to(dtype)
        local = torch.randint(0, 2, (rows,), generator=torch.Generator().manual_seed(rows))  # expert 2: no rows
        y = native.fused_experts_rows(xr, local, p13, p2, 80, **scales)
        want = torch.zeros(rows, 64, dtype=torch.float64)
        for e in range(3):
            m = local == e
            want[m] = swiglu(xr[m].double(), weights[0][2][e].double(), weights[1][2][e].double())
        check(y, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_default_crossover_is_the_kernel_sets_own(isa, dtype):
    """q8_dequant_rows -1 (the default) takes the running kernels' crossover per activation dtype
    (kernels.h): AVX2 keeps float32 codes in registers at every size and dequantizes bfloat16
    tasks above 20 rows; AVX-512 and the generic unit dequantize above 16. The default's output is
    bit for bit the forced path's: one expert, 24 rows."""
    weights = quantized_weights(1, 64, 80)
    p13, p2, scales = packed(weights)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    local = torch.zeros(24, dtype=torch.long)
    default = {k: v for k, v in native.tuning().items() if not k.startswith("max_")}
    assert default["q8_dequant_rows"] == -1
    outs = {}
    try:
        for rows in (-1, 0, 1 << 20):
            native.set_tuning(**{**default, "q8_dequant_rows": rows})
            outs[rows] = native.fused_experts_rows(x, local, p13, p2, 80, **scales)
    finally:
        native.set_tuning(**default)
    assert not torch.equal(outs[0], outs[1 << 20])  # the two paths round apart: the check can tell
    own = {("avx2", torch.float32): 1 << 20, ("avx2", torch.bfloat16): 20}.get((native.isa(), dtype), 16)
    assert torch.equal(outs[-1], outs[1 << 20] if 24 <= own else outs[0])


def test_scale_order_follows_the_packed_columns():
    """Gated scales: per 32-column block, the 32 gate (w1) then the 32 up (w3) rows' scales, zero
    past F; plain ones: per output row, zero past N."""
    s = torch.arange(2 * 40, dtype=torch.float32)[None] + 1  # F = 40: two blocks, the second 8 wide
    g = native.prepack_scales(s, gated=True)
    assert g.shape == native.scale_shape(1, 80, True) == (1, 2, 64)
    assert torch.equal(g[0, 0, :32], s[0, :32]) and torch.equal(g[0, 0, 32:], s[0, 40:72])
    assert torch.equal(g[0, 1, :8], s[0, 32:40]) and torch.equal(g[0, 1, 32:40], s[0, 72:80])
    assert not g[0, 1, 8:32].any() and not g[0, 1, 40:].any()
    p = native.prepack_scales(s[0, :40])
    assert p.shape == (64,) and torch.equal(p[:40], s[0, :40]) and not p[40:].any()


def test_int8_calls_check_their_scales():
    weights = quantized_weights(2, 32, 32)
    p13, p2, scales = packed(weights)
    x, ids, wts = torch.randn(3, 32), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1)
    with pytest.raises(RuntimeError, match="int8 packed weights need w13_scale and w2_scale"):
        native.fused_moe(x, ids, wts, p13, p2, 0, 2, 32)
    with pytest.raises(RuntimeError, match="w2_scale must be a contiguous CPU float32"):
        native.fused_moe(x, ids, wts, p13, p2, 0, 2, 32, w13_scale=scales["w13_scale"],
                         w2_scale=scales["w2_scale"][:, :16].contiguous())
    raw = weights[0][1].contiguous()  # [X, 2F] unpacked: the packed numel when F is a multiple of 32
    assert raw.numel() == scales["w13_scale"].numel()
    with pytest.raises(RuntimeError, match=r"w13_scale must be a contiguous CPU float32 tensor of shape \[2, 1, 64\]"):
        native.fused_moe(x, ids, wts, p13, p2, 0, 2, 32, w13_scale=raw, w2_scale=scales["w2_scale"])
    f13, f2 = native.prepack(weights[0][2], gated=True), native.prepack(weights[1][2])
    with pytest.raises(RuntimeError, match="scales are for int8 and int4 packed weights only"):
        native.fused_moe(x, ids, wts, f13, f2, 0, 2, 32, **scales)


def test_the_loader_packs_int8_experts_where_the_isa_has_int8_products(tiny_ckpt):
    """int8 experts load as native packed codes where the running ISA has int8 products of its
    own (AVX-512, the generic unit) and on torch's weight-only kernels elsewhere (AVX2); int4 ones
    as native packed nibbles where the ISA has int4 products (AVX-512), else on torch's."""
    from moe_parallel.loading.loader import load_experts, open_checkpoint
    from moe_parallel.model.config import ModelConfig
    from moe_parallel.model.experts import QuantExperts
    from moe_parallel.model.packed import PackedExperts

    c = ModelConfig.from_dir(tiny_ckpt)

    def first_group(quant):
        return load_experts(open_checkpoint(tiny_ckpt), c, torch.float32, torch.device("cpu"), range(2), quant)[0]

    try:
        for isa in native.supported_isas():
            native.force(isa)
            group = first_group(INT8)
            if native.has_q8():
                assert isinstance(group, PackedExperts) and group.w13.dtype == torch.int8
                held = [k for k, v in vars(group).items() if isinstance(v, torch.Tensor)]
                assert sorted(held) == ["w13", "w13_scale", "w2", "w2_scale"]  # no loading buffer kept
            else:
                assert isinstance(group, QuantExperts)
            int4 = first_group(QuantConfig("int4", group_size=32))
            if native.has_q4():
                assert isinstance(int4, PackedExperts) and int4.w13.dtype == torch.uint8
            else:
                assert isinstance(int4, QuantExperts)
        if "avx2" in native.supported_isas():  # AVX2 has int8 and int4 products of its own
            native.force("avx2")
            assert native.has_q8() and native.has_q4()
        native.force("generic")
        assert native.has_q8()
        assert not native.has_q4()  # no int4 products in the generic unit: int4 stays on torch's
        assert isinstance(first_group(QuantConfig("int4", group_size=32)), QuantExperts)
        native.force("torch")
        assert isinstance(first_group(INT8), QuantExperts)
        assert isinstance(first_group(QuantConfig("int4", group_size=32)), QuantExperts)
    finally:
        native.force(None)
