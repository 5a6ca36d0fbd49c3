"""Dense projections on weights packed once, at load (CPU): the project's own kernel or oneDNN.

`F.linear` hands ATen a plain row-major weight on every call, and MKL/oneDNN repack it inside
each product. After the dense part is loaded, `pack_dense` swaps each attention projection and
the lm_head for a matrix packed once - the original tensor is dropped, one transient copy per
weight - whose `.linear(x)` `layers.linear` calls as it does a quantized matrix's:

- `NativeMatrix`: the native kernels' blocked layout (`native.prepack`) and `native.dense`, the
  MoE layer's down-projection micro-kernel and task split over one weight;
- `OneDNNMatrix`: oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
  vLLM's CPU build calls `onednn_mm`).

Which one, by `python -m bench.dense` on the 2-core development VM (README, "Native CPU
kernels"): the native kernel wins wherever a decode step's rows are few - the attention
projections 1.2-2.3x faster at 1-64 rows in both dtypes, 0.9-1.0x at 256-2,048 rows (prefill);
the float32 lm_head 1.0-1.2x at 1-64 rows. The bfloat16 lm_head is held both ways
(`RowSplitMatrix`): from a cold cache, as a decode step meets it (`python -m bench.dense --cold`),
the native kernel streams it 1.2-1.8x faster at 1-8 rows, the two tie at 16, and oneDNN's is
1.14-1.19x faster at 32-64 rows; so calls of up to `NATIVE_ROWS` rows go native, larger ones to
oneDNN, for a second copy of one matrix (0.3% of Mixtral's bfloat16 weights). On a CPU where
oneDNN refuses bfloat16 (AVX2 without AVX-NE-CONVERT) every bfloat16 weight is native: there
`F.linear` in bfloat16 took 1.2x the native kernel's time at one row of a [32000, 512] lm_head
and 4.7-7.2x at 16-512 rows of it and of the attention projections (2-core AMD EPYC, AVX2).
The router gates stay plain: at [E, D] the call overhead of either is larger than the product.

Shapes: x [T, in] -> [T, out].
"""

from __future__ import annotations

import torch
from torch import nn

from moe_parallel import native


class _Packed:
    """A weight [rows, cols] held in a kernel's own layout (`packed`)."""

    def __init__(self, w: torch.Tensor, packed: torch.Tensor):
        self.rows, self.cols = w.shape
        self.dtype = w.dtype
        self.packed = packed

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.dtype.itemsize


class OneDNNMatrix(_Packed):
    def __init__(self, w: torch.Tensor):
        super().__init__(w, torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous()))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


class NativeMatrix(_Packed):
    def __init__(self, w: torch.Tensor):
        super().__init__(w, native.prepack(w.detach().contiguous()))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return native.dense(x, self.packed, self.rows)


NATIVE_ROWS = 16  # the bfloat16 lm_head: up to this many rows on the native kernel (module docstring)


class RowSplitMatrix:
    """One weight packed for both kernels; calls of up to `NATIVE_ROWS` rows run the native one."""

    def __init__(self, w: torch.Tensor):
        self.native, self.onednn = NativeMatrix(w), OneDNNMatrix(w)
        self.rows, self.cols, self.dtype = self.native.rows, self.native.cols, self.native.dtype

    @property
    def nbytes(self) -> int:
        return self.native.nbytes + self.onednn.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return (self.native if x.shape[0] <= NATIVE_ROWS else self.onednn).linear(x)


def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed product takes `dtype` on this CPU: float32 on any, bfloat16 only
    with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT (its reorder refuses the weight elsewhere)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_matrix(w: torch.Tensor, lm_head: bool = False) -> NativeMatrix | OneDNNMatrix | RowSplitMatrix | None:
    """The faster packing for `w` (module docstring): native where it is built and takes the
    shape; None where neither kernel takes it (the weight stays plain)."""
    takes = native.available() and (w.dtype == torch.float32 or w.shape[1] % 2 == 0)
    if not takes:
        return OneDNNMatrix(w) if onednn_takes(w.dtype) else None
    if lm_head and w.dtype == torch.bfloat16 and onednn_takes(w.dtype):
        return RowSplitMatrix(w)
    return NativeMatrix(w)


class PackedLinear(nn.Module):
    """A bias-free linear layer over a packed matrix (`weight` is what `linear` takes)."""

    def __init__(self, weight: NativeMatrix | OneDNNMatrix | RowSplitMatrix):
        super().__init__()
        self.weight = weight


def packed_dense(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the dense projections run on packed weights: float32 or bfloat16 on a CPU with
    oneDNN, unless `MOE_SERVE_KERNELS=torch` asks for plain ATen everywhere."""
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and not native.torch_forced())


@torch.no_grad()
def pack_dense(model) -> None:
    """Attention projections and lm_head (not quantized ones, not a tied embedding) packed once."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if isinstance(attn.qkv, torch.Tensor) and (packed := packed_matrix(attn.qkv)) is not None:
            del attn.qkv
            attn.qkv = packed
        if isinstance(attn.o_proj, nn.Linear) and (packed := packed_matrix(attn.o_proj.weight)) is not None:
            attn.o_proj = PackedLinear(packed)
    head = model.lm_head
    if isinstance(head, nn.Linear) and not model.config.tie_word_embeddings:
        if (packed := packed_matrix(head.weight, lm_head=True)) is not None:
            model.lm_head = PackedLinear(packed)
