"""The small layers every decoder layer uses: RMSNorm, rotary embedding, the linear product.

RMSNorm as Mixtral computes it: the mean square in float32, the scale in the model dtype.

RoPE is Mixtral's default (no scaling): the angles are computed in float32 from the integer
positions and cast to the model dtype, as the reference does, so a token's rotation does not
depend on the batch it is in.

`linear` is the one product every projection goes through. On a CPU, BLAS runs `x @ W.T`
with a few dozen rows far below its speed at other row counts while `W @ x.T` keeps its pace
(docs/architecture.md, "dense products"), so decode-sized batches are computed as
`(W @ x.T).T`. Both orders give the same values up to float rounding.

Shapes: x [T, D]; positions [T]; cos/sin [T, Dh]; q/k [T, H, Dh]; w [out, in] -> [T, out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel.runtime.profile import timed


def materialize(module: nn.Module, device: torch.device) -> nn.Module:
    """`module.to_empty(device=device)` for a module built on the meta device: every parameter
    and buffer not yet on `device` becomes an uninitialised tensor there. Not `to_empty`
    itself: its empty_like on meta tensors goes through torch's reference ops, whose first call
    imports sympy (0.4 s of every rank's start)."""
    device = torch.device(device)
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.device != device:
                t = torch.empty(p.shape, dtype=p.dtype, device=device)
                mod._parameters[name] = nn.Parameter(t, requires_grad=p.requires_grad)
        for name, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return module


LARGE_WEIGHT = 1 << 20  # elements: from here the transposed form pays from 2 rows, below it from 12


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    @timed("norm")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; same math when no cast is involved
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary:
    def __init__(self, head_dim: int, theta: float, device: torch.device):
        steps = torch.arange(0, head_dim, 2, dtype=torch.float, device=device)
        self.inv_freq = 1.0 / (theta ** (steps / head_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """`w` is a float weight, or a quantized one (`quant.QuantMatrix`, which brings its kernel)."""
    if not isinstance(w, torch.Tensor):
        return w.linear(x)
    rows = x.shape[0]
    if x.device.type == "cpu" and rows < 64 and rows >= (2 if w.numel() >= LARGE_WEIGHT else 12):
        return torch.mm(w, x.T).T
    return F.linear(x, w)


def linear_t(w: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """The transposed form kept transposed: w [out, in], xt [in, T] -> [out, T]."""
    return torch.mm(w, xt)
