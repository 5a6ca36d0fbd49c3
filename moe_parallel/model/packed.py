"""Experts held in the native kernels' packed layout, each layer one fused call (CPU).

`PackedExperts` is what `FloatExperts` is for the torch path: a contiguous range of a layer's
experts, float32 or bfloat16, on the CPU, run by `moe_parallel.native` instead of ATen. With
`quant=QuantConfig("int8")` it holds int8 codes in the same blocked order and float32 scales per
output column (`w13_scale`, `w2_scale`), quantized as they stream in (or read as they are from a
compressed-tensors checkpoint, through the same `QuantSink`), and the activations stay in `dtype`:
what `QuantExperts` is on the torch path, without casting activations to bfloat16. With
`QuantConfig("int4", group_size=G)` it holds int4 codes two a byte (uint8, csrc/kernels.h) and per
(group of G inputs, output column) a float32 scale and bias (`-(8 + zero) * scale`) in `w13_scale` /
`w2_scale`, dequantized in registers by the kernels. The
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
from moe_parallel.model.quant import NO_QUANT, QuantConfig, Quantized, QuantSink
from moe_parallel.native.kernels import BLOCK
from moe_parallel.runtime.profile import timed

HALF = BLOCK  # gate columns, then as many up columns, in each packed w13 block


def native_experts(device: torch.device, dtype: torch.dtype, quant: QuantConfig = NO_QUANT) -> bool:
    """Whether experts on `device` in `dtype` (quantized per `quant`) run on the native kernels:
    float experts wherever the library runs, int8 and int4 ones where the ISA has products of its
    own for them (elsewhere they stay on torch's weight-only kernels)."""
    if not (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16) and native.available()):
        return False
    if not quant.enabled:
        return True
    if quant.kernel != "auto":
        return False
    return native.has_q8() if quant.scheme == "int8" else native.has_q4()


class _QuantSlot:
    """One expert's w13 or w2 in a group's quantized packed tensors, as a `QuantSink` matrix (its
    `cfg` quantizes what streams in, `put(start, q)` packs it): w1 and w3 are packed alone through
    `scratch`, one buffer for the group's loading, and copied into the halves of each w13 block."""

    def __init__(self, group: PackedExperts, i: int, gated: bool, scratch: torch.Tensor | None = None):
        self.group, self.i, self.gated, self.cfg, self.scratch = group, i, gated, group.quant, scratch


class Q8Slot(_QuantSlot):
    """int8: the codes of one checkpoint tensor (rows [start, start + n) of the logical weight) and
    its per-row scales."""

    def put(self, start: int, q: Quantized) -> None:
        g, i = self.group, self.i
        if q.zero is not None or q.scale.shape[1] != 1:
            raise ValueError("int8 experts are symmetric per output channel (one scale a row, no zero point)")
        codes, scale = q.codes.to(torch.int8), q.scale[:, 0].float()
        if not self.gated:  # w2 [D, F]
            native.prepack_into(codes, g.w2[i])
            g.w2_scale[i] = _padded(scale, g.w2_scale.shape[-1])
            return
        half = slice(0, HALF) if start == 0 else slice(HALF, 2 * HALF)  # w1 rows 0..F, w3 rows F..2F
        native.prepack_into(codes, self.scratch)
        g.w13[i, :, :, half].copy_(self.scratch)
        g.w13_scale[i, :, half] = _padded(scale, g.w13_scale.shape[1] * HALF).view(-1, HALF)


class Q4Slot(_QuantSlot):
    """int4: the codes of one checkpoint tensor into their nibbles (plain: 16 bytes a k-row, 32
    columns) and its per-group scales and zero points into the packed scales and biases."""

    def put(self, start: int, q: Quantized) -> None:
        g, i = self.group, self.i
        codes, scale = q.codes.to(torch.int8), q.scale.float()
        if not self.gated:  # w2 [D, F]
            native.prepack_q4_into(codes, g.w2[i])
            g.w2_scale[i] = native.prepack_q4_scales(scale, q.zero)
            return
        half = slice(0, HALF) if start == 0 else slice(HALF, 2 * HALF)  # w1 rows 0..F, w3 rows F..2F
        nibbles = slice(half.start // 2, half.stop // 2)
        native.prepack_q4_into(codes, self.scratch)
        g.w13[i, :, :, nibbles].copy_(self.scratch)
        g.w13_scale[i, :, :, :, half] = native.prepack_q4_scales(scale, q.zero)


def _padded(v: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([v, v.new_zeros(n - v.shape[0])]) if v.shape[0] < n else v


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
    def __init__(self, experts: range, hidden: int, intermediate: int, dtype: torch.dtype,
                 quant: QuantConfig = NO_QUANT):
        super().__init__()
        if quant.enabled and quant.scheme not in ("int8", "int4"):
            raise ValueError(f"packed experts are float, int8 or int4, not {quant.scheme}")
        self.first_expert, self.hidden, self.intermediate, self.quant = experts.start, hidden, intermediate, quant
        self.act_dtype = dtype  # activations (x, outputs); the weights' dtype when not quantized
        x = len(experts)
        self.w13_scale = self.w2_scale = None
        if quant.scheme == "int4":
            gs = quant.group_size
            for name, cols in (("w1/w3", hidden), ("w2", intermediate)):
                if cols % gs:
                    raise ValueError(f"{name}: {cols} input features are not a multiple of group_size={gs}")
            cpu = {"device": "cpu"}
            self.w13 = torch.zeros(native.q4_packed_shape(x, 2 * intermediate, hidden, True), dtype=torch.uint8, **cpu)
            self.w2 = torch.zeros(native.q4_packed_shape(x, hidden, intermediate, False), dtype=torch.uint8, **cpu)
            self.w13_scale = torch.zeros(native.q4_scale_shape(x, 2 * intermediate, hidden // gs, True), **cpu)
            self.w2_scale = torch.zeros(native.q4_scale_shape(x, hidden, intermediate // gs, False), **cpu)
            return
        wdt = torch.int8 if quant.enabled else dtype
        self.w13 = torch.zeros(native.packed_shape(x, 2 * intermediate, hidden, True, wdt), dtype=wdt, device="cpu")
        self.w2 = torch.zeros(native.packed_shape(x, hidden, intermediate, False, wdt), dtype=wdt, device="cpu")
        if quant.enabled:
            self.w13_scale = torch.zeros(native.scale_shape(x, 2 * intermediate, True), dtype=torch.float32,
                                         device="cpu")
            self.w2_scale = torch.zeros(native.scale_shape(x, hidden, False), dtype=torch.float32, device="cpu")

    @property
    def nbytes(self) -> int:
        parts = (self.w13, self.w2, self.w13_scale, self.w2_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def scales(self) -> dict[str, torch.Tensor | None]:
        """The int8 column scales or int4 scales and biases the native calls take (None for float experts)."""
        return {"w13_scale": self.w13_scale, "w2_scale": self.w2_scale}

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def destinations(self, layer: int) -> dict[str, PackSink]:
        """Checkpoint name -> the sink that packs it: w1 into the gate half of expert i's w13
        blocks, w3 into the up half, w2 into expert i's w2."""
        f, d = self.intermediate, self.hidden
        if self.quant.enabled:
            half = HALF // 2 if self.quant.scheme == "int4" else HALF  # bytes of a half k-row: two int4 codes a byte
            scratch = torch.empty(self.w13[0, :, :, :half].shape, dtype=self.w13.dtype, device="cpu")
            slot = Q4Slot if self.quant.scheme == "int4" else Q8Slot
            out = {}
            for i in range(self.num_experts):
                e, gated, plain = self.first_expert + i, slot(self, i, True, scratch), slot(self, i, False)
                out |= {expert_name(layer, e, "w1"): QuantSink(gated, 0, (f, d)),
                        expert_name(layer, e, "w3"): QuantSink(gated, f, (f, d)),
                        expert_name(layer, e, "w2"): QuantSink(plain, 0, (d, f))}
            return out
        scratch = torch.empty(native.gate_up(self.w13[0])[0].shape, dtype=self.w13.dtype, device="cpu")
        out = {}
        for i in range(self.num_experts):
            e = self.first_expert + i
            gate, up = native.gate_up(self.w13[i])  # views shaped as w1 / w3 packed alone
            out |= {expert_name(layer, e, "w1"): PackSink(gate, (f, d), scratch),
                    expert_name(layer, e, "w3"): PackSink(up, (f, d), scratch),
                    expert_name(layer, e, "w2"): PackSink(self.w2[i], (d, f))}
        return out

    @timed("experts")
    def fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The layer's output [T, D]: sum over k of weights[t, k] x expert ids[t, k] of x[t]."""
        return native.fused_moe(x, ids, weights, self.w13, self.w2, self.first_expert, self.num_experts,
                                self.intermediate, **self.scales)

    def _compute(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """One SwiGLU output per routed row x [N, D], expert local_ids[i]: [N, D], rows in order."""
        return native.fused_experts_rows(x, local_ids, self.w13, self.w2, self.intermediate, **self.scales)
