"""Float experts held in the native kernels' packed layout, each layer one fused call (CPU).

`PackedExperts` is what `FloatExperts` is for the torch path: a contiguous range of a layer's
experts, float32 or bfloat16, on the CPU, run by `moe_parallel.native` instead of ATen. The
packed tensors are allocated once at final size; each checkpoint tensor streams into a
`PackSink`, which packs it (a transient of one tensor) straight into its expert's slot: w1 and
w3 fill the gate and up halves of each 32-column block of `w13`, w2 its own. So loading peaks
at the final size plus about one tensor, as for unpacked experts.

Calls: `fused(x, weights, ids)` is the whole layer in one call, weighted top-k sum included
(`single`); `forward(x, local_ids)` gives one output row per routed row in arrival order
(an expert rank of `disaggregated`).

Shapes: T tokens, K experts per token, N routed rows, D hidden, F intermediate, X experts here.
"""

from __future__ import annotations

import torch

from moe_parallel import native
from moe_parallel.model.experts import Experts
from moe_parallel.model.names import expert_name
from moe_parallel.native.kernels import BLOCK
from moe_parallel.runtime.profile import timed

HALF = BLOCK  # gate columns, then as many up columns, in each packed w13 block


def native_experts(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether float experts on `device` in `dtype` run on the native kernels."""
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16) and native.available()


class PackSink:
    """A loader destination: `copy_(src)` packs one checkpoint tensor into its place, straight
    into `dest` when it is contiguous (w2), else through `scratch`, one buffer reused for every
    tensor of the group (a fresh one per tensor fragments the heap; the loading-memory test bounds
    the resident peak)."""

    def __init__(self, dest: torch.Tensor, shape: tuple[int, int], scratch: torch.Tensor | None = None):
        self.dest, self.shape, self.scratch = dest, torch.Size(shape), scratch

    def copy_(self, src: torch.Tensor) -> None:
        src = src.to(self.dest.dtype)
        if self.dest.is_contiguous():
            native.prepack_into(src, self.dest)
            return
        native.prepack_into(src, self.scratch)
        self.dest.copy_(self.scratch)


class PackedExperts(Experts):
    def __init__(self, experts: range, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.first_expert, self.hidden, self.intermediate = experts.start, hidden, intermediate
        x = len(experts)
        self.w13 = torch.zeros(native.packed_shape(x, 2 * intermediate, hidden, True, dtype), dtype=dtype, device="cpu")
        self.w2 = torch.zeros(native.packed_shape(x, hidden, intermediate, False, dtype), dtype=dtype, device="cpu")

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def destinations(self, layer: int) -> dict[str, PackSink]:
        """Checkpoint name -> the sink that packs it: w1 into the gate half of expert i's w13
        blocks, w3 into the up half, w2 into expert i's w2."""
        f, d = self.intermediate, self.hidden
        scratch = torch.empty(self.w13[0, :, :, :HALF].shape, dtype=self.w13.dtype, device="cpu")
        out = {}
        for i in range(self.num_experts):
            e = self.first_expert + i
            gate, up = self.w13[i, :, :, :HALF], self.w13[i, :, :, HALF:]  # [blocks, K(/2), 32(, 2)] views
            out |= {expert_name(layer, e, "w1"): PackSink(gate, (f, d), scratch),
                    expert_name(layer, e, "w3"): PackSink(up, (f, d), scratch),
                    expert_name(layer, e, "w2"): PackSink(self.w2[i], (d, f))}
        return out

    @timed("experts")
    def fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The layer's output [T, D]: sum over k of weights[t, k] x expert ids[t, k] of x[t]."""
        return native.fused_moe(x, ids, weights, self.w13, self.w2, self.first_expert, self.num_experts,
                                self.intermediate)

    def _compute(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """One SwiGLU output per routed row x [N, D], expert local_ids[i]: [N, D], rows in order."""
        return native.fused_experts_rows(x, local_ids, self.w13, self.w2, self.intermediate)
