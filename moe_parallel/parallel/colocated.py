"""The `colocated` layout: DeepSpeed-MoE's own expert-parallel layer, loaded with Mixtral weights.

Every rank holds the dense model and E/ep experts of each layer inside
`deepspeed.moe.layer.MoE`; DeepSpeed gates, dispatches over its expert-parallel group (an
all-to-all of capacity-padded [E, C, D] buffers), runs the experts and combines. Gating is
made deterministic and lossless to match Mixtral: `top2_2nd_expert_sampling=False`,
`use_rts=False`, `drop_tokens=False` (capacity = the largest expert load across the group).
This is the DeepSpeed-native baseline the `disaggregated` layout is measured against.

Shapes: x [T, D]; DeepSpeed's internal buffers are [E, C, D] with C the capacity.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel.model.config import ModelConfig
from moe_parallel.model.layers import materialize
from moe_parallel.model.moe import Done
from moe_parallel.model.names import expert_name
from moe_parallel.model.packed import PackedExperts, native_experts
from moe_parallel.model.quant import NO_QUANT, QuantConfig, QuantMatrix, QuantSink


class SwiGLU(nn.Module):
    """One Mixtral expert as DeepSpeed wants it: a module it can copy once per local expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class QuantSwiGLU(nn.Module):
    """One quantized expert, the same math as the other layouts' quantized experts, for DeepSpeed's
    expert list; DeepSpeed hands it capacity-padded [.., C, D] inputs. Where the native kernels have
    products for the scheme (`packed.native_experts`) it is a one-expert `PackedExperts`, as
    `single` and the expert ranks hold them; elsewhere `QuantExperts`' math (w13 fused) on torch's
    weight-only kernels."""

    def __init__(self, hidden: int, intermediate: int, cfg: QuantConfig, act_dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.intermediate, self.hidden = intermediate, hidden
        self.packed = PackedExperts(range(1), hidden, intermediate, act_dtype, cfg) \
            if native_experts(device, act_dtype, cfg) else None
        if self.packed is None:
            cfg.check_shape(intermediate, hidden, "w1/w3")
            cfg.check_shape(hidden, intermediate, "w2")
            self.w13 = QuantMatrix(2 * intermediate, hidden, cfg, device, act_dtype)
            self.w2 = QuantMatrix(hidden, intermediate, cfg, device, act_dtype)

    def destinations(self, layer: int, e: int) -> dict[str, QuantSink]:
        if self.packed is not None:
            self.packed.first_expert = e  # the names it answers to; its one expert is local 0
            return self.packed.destinations(layer)
        f, d = self.intermediate, self.hidden
        return {expert_name(layer, e, "w1"): QuantSink(self.w13, 0, (f, d)),
                expert_name(layer, e, "w3"): QuantSink(self.w13, f, (f, d)),
                expert_name(layer, e, "w2"): QuantSink(self.w2, 0, (d, f))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.packed is not None:
            return self.packed._compute(rows, rows.new_zeros(rows.shape[0], dtype=torch.int64)).view(x.shape)
        gate, up = self.w13.linear(rows).chunk(2, dim=-1)
        return self.w2.linear(F.silu(gate) * up).view(x.shape)


class DeepSpeedMoEBlock(nn.Module):
    """DeepSpeed's `MoE` built on the meta device, then allocated (uninitialised) on the rank's
    device: the checkpoint streams into its experts (`destinations`), so no randomly initialised
    copy of the experts ever exists."""

    def __init__(self, c: ModelConfig, ep: int, dtype: torch.dtype, device: torch.device,
                 quant: QuantConfig = NO_QUANT):
        super().__init__()
        from deepspeed.moe.layer import MoE

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        with torch.device("meta"):
            self.moe = MoE(hidden_size=c.hidden_size, expert=SwiGLU(c.hidden_size, c.intermediate_size),
                           num_experts=c.num_experts, ep_size=ep, k=c.experts_per_token, drop_tokens=False,
                           use_rts=False, top2_2nd_expert_sampling=False, min_capacity=0)
        self.moe.set_deepspeed_parallelism()
        if quant.enabled:  # DeepSpeed's float experts (still on meta) give way to quantized ones
            experts = self.moe.deepspeed_moe.experts.deepspeed_experts
            for i in range(len(experts)):
                experts[i] = QuantSwiGLU(c.hidden_size, c.intermediate_size, quant, dtype, device)
        materialize(self.moe.to(dtype), device)
        self.requires_grad_(False).eval()
        self.device, self.quantized = device, quant.enabled

    def destinations(self, layer: int, experts: range) -> dict[str, torch.Tensor]:
        """Checkpoint name -> parameter, for this rank's experts of `layer`."""
        out = {}
        for e, expert in zip(experts, self.moe.deepspeed_moe.experts.deepspeed_experts, strict=True):
            if self.quantized:
                out |= expert.destinations(layer, e)
            else:
                out |= {expert_name(layer, e, w): getattr(expert, w).weight for w in ("w1", "w2", "w3")}
        return out

    @torch.no_grad()
    def load_gate(self, gate: torch.Tensor) -> None:
        self.moe.deepspeed_moe.gate.wg.weight.copy_(gate)

    def start(self, x: torch.Tensor, micro_batch: int = 0) -> Done:
        """The decoder's call: DeepSpeed's layer runs at once (`decoder.CausalLM.run`)."""
        return Done(self(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        if t == 0:  # every rank must join each layer's all-to-all, even with no tokens of its own
            x = x.new_zeros(1, x.shape[1])
        # DeepSpeed's gating makes a few scalars without naming a device; scope them explicitly
        with torch.device(self.device):
            out, _, _ = self.moe(x)
        return out[:t]
