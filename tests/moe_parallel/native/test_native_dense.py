"""The native dense product (`native.dense` on a `native.prepack`ed weight) against F.linear in
float64: every ISA this CPU runs, float32 and bfloat16, widths off the 32-column block, 0 to
1,000+ rows (row blocks, K slices), the tunings' extremes, the checks; and which packing
`pack_dense` gives each weight of a loaded model (the layouts' transformers parity tests run
through it), the MOE_SERVE_KERNELS=torch switch included.

Skipped when the library is not built; a failure in CI, where the Makefile builds it first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_parallel import native
from moe_parallel.loading.loader import build_single
from moe_parallel.model import dense
from moe_parallel.model.dense import NATIVE_ROWS, NativeMatrix, RowSplitMatrix, onednn_takes
from tests.moe_parallel.cases import make
from tests.moe_parallel.native.test_native_moe import TOL, tuning  # noqa: F401
from tests.moe_parallel.native_support import require_library

require_library()

# (rows, n, k): qkv of bench-214m at one row, an empty step, n and k of 1, n off the block with
# odd k (float32) / even k, an lm_head-like width, 1,100 rows (several row blocks)
SHAPES = [(1, 768, 512), (0, 40, 16), (1, 1, 2), (7, 33, 41), (9, 70, 48), (3, 1000, 64), (1100, 96, 40)]


def expected(x, w):
    return F.linear(x.double(), w.double())


CASES = [(dtype, s) for dtype in (torch.float32, torch.bfloat16) for s in SHAPES
         if dtype == torch.float32 or s[2] % 2 == 0]  # bfloat16 takes even K (the checks refuse odd)


@pytest.mark.parametrize(("dtype", "shape"), CASES, ids=lambda c: "T{}-N{}-K{}".format(*c) if isinstance(c, tuple)
                         else str(c).split(".")[-1])
def test_dense_matches_f_linear(isa, dtype, shape):
    rows, n, k = shape
    g = torch.Generator().manual_seed(rows + n + k)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    x = torch.randn(rows, k, generator=g).to(dtype)
    out = native.dense(x, native.prepack(w), n)
    assert out.dtype == dtype and out.shape == (rows, n)
    torch.testing.assert_close(out.double(), expected(x, w), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_under_every_tuning(isa, tuning, dtype):  # noqa: F811
    """One-row tiles, blocks of 7 rows, odd K slices with prefetch; no slices; the defaults."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(100, 76, generator=g) / 9).to(dtype)
    x = torch.randn(150, 76, generator=g).to(dtype)
    torch.testing.assert_close(native.dense(x, native.prepack(w), 100).double(), expected(x, w), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_bfloat16_rounds_once_as_f_linear_does():
    """Float32 sums rounded to bfloat16 once: within one bfloat16 ulp of F.linear's result."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(64, 512, generator=g) / 22).bfloat16()
    x = torch.randn(5, 512, generator=g).bfloat16()
    ours, ref = native.dense(x, native.prepack(w), 64).float(), F.linear(x, w).float()
    assert ((ours - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()


def test_dense_checks_say_what_is_wrong():
    w = torch.randn(40, 16)
    packed = native.prepack(w)
    with pytest.raises(RuntimeError, match="expected"):
        native.dense(torch.randn(2, 16), packed, 65)  # more 32-column blocks than the packed weight holds
    with pytest.raises(RuntimeError, match="expected"):
        native.dense(torch.randn(2, 17), packed, 40)
    with pytest.raises(RuntimeError, match="like x"):
        native.dense(torch.randn(2, 16).bfloat16(), packed, 40)
    with pytest.raises(RuntimeError, match="even K"):
        native.dense(torch.randn(2, 15).bfloat16(), native.prepack(torch.randn(40, 15).bfloat16()), 40)
    with pytest.raises(RuntimeError, match=r"\[T, K\]"):
        native.dense(torch.randn(16), packed, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_model_packs_each_dense_weight_for_its_faster_kernel(tmp_path, dtype):
    """Attention projections on the native kernel; lm_head on it in float32, on both in bfloat16,
    the native one up to NATIVE_ROWS rows (model/dense.py has the measurements). The products'
    values: the tests above, and every layout's parity test against transformers, which loads
    through this."""
    runner = build_single(make(tmp_path, "mixtral"), dtype, max_model_len=64)
    model = runner.model
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv, NativeMatrix) and isinstance(attn.o_proj.weight, NativeMatrix)
    head = model.lm_head.weight
    if dtype == torch.float32 or not onednn_takes(dtype):  # an AVX2 CPU: oneDNN refuses bfloat16
        assert isinstance(head, NativeMatrix)
        return
    assert isinstance(head, RowSplitMatrix) and head.nbytes == 2 * head.native.nbytes
    calls = []
    for name in ("native", "onednn"):
        m = getattr(head, name)
        m.linear = lambda x, f=m.linear, n=name: calls.append((n, x.shape[0])) or f(x)
    x = torch.randn(NATIVE_ROWS + 1, head.cols, dtype=dtype)
    both = [head.linear(x[:NATIVE_ROWS]), head.linear(x)]
    assert calls == [("native", NATIVE_ROWS), ("onednn", NATIVE_ROWS + 1)]
    torch.testing.assert_close(both[1][:NATIVE_ROWS], both[0], atol=2e-2, rtol=2e-2)


def test_where_onednn_refuses_bfloat16_every_weight_is_native_or_plain(tmp_path, monkeypatch):
    """An AVX2 CPU without AVX-NE-CONVERT: oneDNN's reorder refuses a bfloat16 weight, so the
    lm_head is native alone, and a weight the native kernel cannot take either stays plain."""
    monkeypatch.setattr(dense, "onednn_takes", lambda dt: dt == torch.float32)
    path = make(tmp_path, "mixtral")
    model = build_single(path, torch.bfloat16, max_model_len=64).model
    assert isinstance(model.lm_head.weight, NativeMatrix)
    assert isinstance(model.model.layers[0].self_attn.qkv, NativeMatrix)
    monkeypatch.setattr(native, "available", lambda: False)
    w = torch.randn(32, 16, dtype=torch.bfloat16)
    assert dense.packed_matrix(w, lm_head=True) is None
    assert isinstance(dense.packed_matrix(w.float()), dense.OneDNNMatrix)


def test_the_torch_setting_keeps_plain_weights(tmp_path):
    try:
        native.force("torch")
        model = build_single(make(tmp_path, "mixtral"), max_model_len=64).model
    finally:
        native.force(None)
    assert isinstance(model.model.layers[0].self_attn.qkv, torch.Tensor)
    assert isinstance(model.lm_head.weight, torch.Tensor)
