"""Dense projections on oneDNN with each weight reordered once, at load (CPU).

`F.linear` hands ATen a plain row-major weight on every call, and MKL/oneDNN repack it inside
each product; a weight reordered once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what vLLM's CPU build calls `onednn_mm`) skips
that. After the dense part is loaded, `pack_dense` swaps each attention projection and the
lm_head for a `OneDNNMatrix` (the original tensor is dropped: one transient copy per weight);
`linear.linear` calls its `.linear(x)` as it does a quantized matrix's. The router gates stay
plain: at [E, D] the call overhead of oneDNN is larger than the product (`bench.dense` has the
table this choice was made from).

Shapes: x [T, in] -> [T, out].
"""

from __future__ import annotations

import torch
from torch import nn

from moe_parallel import native


class OneDNNMatrix:
    def __init__(self, w: torch.Tensor):
        self.rows, self.cols = w.shape
        self.dtype = w.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.dtype.itemsize

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


class OneDNNLinear(nn.Module):
    """A bias-free linear layer over a `OneDNNMatrix` (`weight` is what `linear` takes)."""

    def __init__(self, weight: OneDNNMatrix):
        super().__init__()
        self.weight = weight


def onednn_dense(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the dense projections run on reordered oneDNN weights: float32 or bfloat16 on a
    CPU with oneDNN, unless `MOE_SERVE_KERNELS=torch` asks for plain ATen everywhere."""
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and not native.torch_forced())


@torch.no_grad()
def pack_dense(model) -> None:
    """Attention projections and lm_head (not quantized ones, not a tied embedding) to oneDNN."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if isinstance(attn.qkv, torch.Tensor):
            packed = OneDNNMatrix(attn.qkv)
            del attn.qkv
            attn.qkv = packed
        if isinstance(attn.o_proj, nn.Linear):
            attn.o_proj = OneDNNLinear(OneDNNMatrix(attn.o_proj.weight))
    if isinstance(model.lm_head, nn.Linear) and not model.config.tie_word_embeddings:
        model.lm_head = OneDNNLinear(OneDNNMatrix(model.lm_head.weight))
