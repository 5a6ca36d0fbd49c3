"""The one matrix product every projection goes through, and why it is not just `F.linear`.

On CPU, BLAS runs `x @ W.T` with a few dozen rows far below its speed for other row counts
(measured with MKL: 2.5x slower at 32 rows for a [3584, 512] weight, 1.7x at 8 rows for the
[32000, 512] lm_head), while `W @ x.T` keeps its pace. Decode batches of a few to 63 tokens are
exactly the serving sweet spot, so there the product is computed as `(W @ x.T).T`: from 2 rows
for large weights, from 12 rows for small ones (where the plain form wins below that). Both
orders give the same values up to float rounding.

Shapes: x [T, in], w [out, in] -> [T, out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LARGE_WEIGHT = 1 << 20  # elements


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
