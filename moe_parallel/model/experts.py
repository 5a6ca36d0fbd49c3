"""SwiGLU experts of one layer on the torch path: rows sorted by expert, each expert's rows at once.

An `Experts` holds a contiguous range of a layer's experts (all of them in the `single`
layout, E/N of them on an expert rank). `w13` stacks each expert's w1 (gate) and w3 (up) so one
matrix product gives both halves; `w2` projects back down. The stacked tensors are allocated
once on the worker's device and the checkpoint's tensors are streamed into their slices.

Shapes: N routed rows (a token appears once per expert it chose), D hidden, F intermediate,
X experts held here; x [N, D], local ids [N] in [0, X) -> y [N, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel.model.layers import linear_t
from moe_parallel.model.names import expert_name
from moe_parallel.model.quant import QuantConfig, QuantMatrix, QuantSink
from moe_parallel.runtime.profile import timed

SMALL_ROWS = 8  # below this many rows, the plain product is as fast or faster on a CPU


def expert_counts(ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rows per expert [X] (int64), without a host sync: `bincount` on CUDA reads the largest id
    back to size its output, a scatter-add into X counters does not. `weights` [N] (int64)
    counts each row that many times (0 for a padding row)."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids) if weights is None else weights)


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order that sorts rows by expert [N] (stable: rows of one expert keep their order),
    and the rows per expert [X]."""
    return torch.argsort(ids, stable=True), expert_counts(ids, num_experts)


def unsort(ys: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows computed in `order` back in their original places."""
    y = torch.empty_like(ys)
    y[order] = ys
    return y


class Experts(nn.Module):
    """A contiguous range of one layer's experts (all of them in `single`, E/N on an expert
    rank): rows sorted by expert, one SwiGLU per expert that got rows, results back in row
    order. Subclasses hold the weights (`w13`, `w2`: stacked tensors or one matrix per
    expert) and compute one expert's `_swiglu`."""

    first_expert: int

    @property
    def num_experts(self) -> int:
        return len(self.w13)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in (*self.w13, *self.w2))

    @timed("experts")
    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D], each row's local expert local_ids [N] -> [N, D]."""
        return self._compute(x, local_ids)

    def _compute(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        order, counts = sort_by_expert(local_ids, self.num_experts)
        xs = x.index_select(0, order)  # [N, D] sorted by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                ys[start : start + n] = self._swiglu(xs[start : start + n], e)
                start += n
        return unsort(ys, order)

    def _swiglu(self, x: torch.Tensor, e: int) -> torch.Tensor:
        raise NotImplementedError


class FloatExperts(Experts):
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, first_expert: int):
        super().__init__()
        self.w13 = nn.Parameter(w13, requires_grad=False)  # [X, 2F, D]
        self.w2 = nn.Parameter(w2, requires_grad=False)  # [X, D, F]
        self.first_expert = first_expert

    @classmethod
    def empty(cls, experts: range, hidden: int, intermediate: int, dtype: torch.dtype,
              device: torch.device) -> FloatExperts:
        """Uninitialised weights on `device`, to be filled through `destinations()`."""
        x = len(experts)
        w13 = torch.empty(x, 2 * intermediate, hidden, dtype=dtype, device=device)
        w2 = torch.empty(x, hidden, intermediate, dtype=dtype, device=device)
        return cls(w13, w2, experts.start)

    def destinations(self, layer: int) -> dict[str, torch.Tensor]:
        """Checkpoint name -> slice of the stacked weights it is loaded into (w1 and w3 halves of w13)."""
        f = self.w2.shape[-1]
        out = {}
        for i in range(self.num_experts):
            e = self.first_expert + i
            out |= {expert_name(layer, e, "w1"): self.w13[i, :f], expert_name(layer, e, "w3"): self.w13[i, f:],
                    expert_name(layer, e, "w2"): self.w2[i]}
        return out

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def _compute(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        if self._grouped_ok(x):
            return self._grouped(x, local_ids)
        return super()._compute(x, local_ids)

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """`torch._grouped_mm` runs on CPU in every float dtype; on CUDA this path is taken for
        bfloat16 on compute capability 9.0 and newer (below it, torch falls back to a loop that
        reads the offsets back). Rows must be 16-byte aligned."""
        row_bytes = min(self.w2.shape[-1], self.w2.shape[-2]) * x.element_size()
        if row_bytes % 16:
            return False
        if x.device.type == "cpu":
            return True
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)

    def _grouped(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Every expert's SwiGLU as two grouped products over rows sorted by expert, the group
        offsets computed on the device: no host sync, no per-expert Python loop."""
        if x.shape[0] == 0:  # an expert rank no row was sent to at this layer
            return torch.empty_like(x)
        order, counts = sort_by_expert(local_ids, self.num_experts)
        offsets = counts.cumsum(0).to(torch.int32)  # [X]
        xs = x.index_select(0, order)  # [N, D] sorted by expert
        gate, up = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # [N, F] each
        ys = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offsets)  # [N, D]
        return unsort(ys, order)

    def _swiglu(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if x.shape[0] < SMALL_ROWS or x.device.type != "cpu":
            gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)  # [n, F] each
            return F.linear(F.silu(gate) * up, self.w2[e])  # [n, D]
        # from a few rows on, computed transposed (rows as columns): CPU BLAS keeps its pace this
        # way, and the gate/up halves come out as contiguous slices (see layers.linear)
        gate, up = linear_t(self.w13[e], x.T).chunk(2, dim=0)  # [F, n] each
        return linear_t(self.w2[e], F.silu(gate) * up).T  # [n, D]


class QuantExperts(Experts):
    """The same experts with weight-only int8 / int4 weights (`quant.py`): w13 fused per expert
    (w1 and w3 quantized as they stream in, into one matrix), w2 on its own."""

    def __init__(self, experts: range, hidden: int, intermediate: int, cfg: QuantConfig, act_dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        cfg.check_shape(intermediate, hidden, "w1/w3")  # each is put on its own, at row 0 or F of w13
        cfg.check_shape(hidden, intermediate, "w2")
        self.first_expert, self.intermediate, self.hidden = experts.start, intermediate, hidden
        self.w13 = [QuantMatrix(2 * intermediate, hidden, cfg, device, act_dtype) for _ in experts]
        self.w2 = [QuantMatrix(hidden, intermediate, cfg, device, act_dtype) for _ in experts]
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def destinations(self, layer: int) -> dict[str, QuantSink]:
        """Checkpoint name -> the sink that quantizes it into place (w1 then w3 rows of w13)."""
        f, d = self.intermediate, self.hidden
        out = {}
        for i in range(self.num_experts):
            e = self.first_expert + i
            out |= {expert_name(layer, e, "w1"): QuantSink(self.w13[i], 0, (f, d)),
                    expert_name(layer, e, "w3"): QuantSink(self.w13[i], f, (f, d)),
                    expert_name(layer, e, "w2"): QuantSink(self.w2[i], 0, (d, f))}
        return out

    def _swiglu(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = self.w13[e].linear(x).chunk(2, dim=-1)  # [n, F] each
        return self.w2[e].linear(F.silu(gate) * up)  # [n, D]
