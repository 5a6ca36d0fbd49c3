"""A decode layer as one native call (CPU): the whole layer in `single`, its attention half where
the experts are elsewhere.

A batch-1 decode step on the CPU spends about a third of its time outside the weight-reading
kernels: some 40 ATen calls per layer through the interpreter (norms, router, residual adds,
the glue between the attention kernels), each a few microseconds. `native.decode_layer` runs
the same layer - norm, qkv, RoPE + cache write, decode attention, o_proj, residual, norm,
Mixtral's routing, the fused MoE, residual - as one call, with the same kernels and the same
roundings (csrc/ops.cpp). Where the experts are on other ranks (`disaggregated`'s attention
rank), `native.decode_attention_block` does the same up to the routing - norm, attention,
residual, norm, top-k - and the experts backend takes the rows from there, as it does from the
Python path. `DecoderLayer.start` takes either when `plan` finds the layer's weights packed for
the native kernels and the step is plain decode:

- the step: one group of one query per sequence in order (`single_group`, `decode_pos`), no
  LoRA adapter, on the CPU;
- the layer: qkv and o_proj as `NativeMatrix`es, norms and the router gate plain tensors of the
  activations' dtype, and an experts backend; the whole layer when it is a `LocalExperts` whose
  group for the layer is a `PackedExperts` holding every expert (and no CUDA-graph padding rows).

Anything else (prefill, mixed steps, quantized or LoRA weights, DeepSpeed's `colocated` block)
runs the layer's Python path. `ENABLED = False` turns it off (the benchmarks compare both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_parallel import native
from moe_parallel.model.dense import NativeMatrix
from moe_parallel.model.moe import Done, ExpertsBackend, Handle, LocalExperts
from moe_parallel.model.packed import PackedExperts
from moe_parallel.runtime.profile import timed

ENABLED = True


@dataclass(frozen=True)
class LayerPlan:
    qkv: NativeMatrix
    o_proj: NativeMatrix
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps: float
    gate: torch.Tensor
    k: int
    backend: ExpertsBackend
    experts: PackedExperts | None  # every expert of the layer here: the whole layer is one call


def plan(layer) -> LayerPlan | None:
    """The layer's weights for `decode_layer`, or None when they are not all packed for it."""
    attn, moe = layer.self_attn, layer.block_sparse_moe
    backend = getattr(moe, "experts", None)  # DeepSpeed's block (colocated) has none of these
    if not (native.available() and isinstance(attn.qkv, NativeMatrix) and backend is not None
            and isinstance(getattr(attn.o_proj, "weight", None), NativeMatrix)):
        return None
    gate, n1, n2 = moe.gate.weight, layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    dtype = attn.qkv.dtype
    if not (all(isinstance(w, torch.Tensor) and w.dtype == dtype for w in (gate, n1, n2))
            and layer.input_layernorm.eps == layer.post_attention_layernorm.eps):
        return None
    group = None  # experts elsewhere: the attention block, the backend takes the rows
    if isinstance(backend, LocalExperts):  # the whole layer, on the packed experts only
        group = backend.groups[attn.layer]
        if not (isinstance(group, PackedExperts) and group.first_expert == 0
                and group.num_experts == gate.shape[0]):
            return None
    return LayerPlan(attn.qkv, attn.o_proj.weight, n1.detach(), n2.detach(), layer.input_layernorm.eps,
                     gate.detach(), moe.k, backend, group)


def step_fits(x: torch.Tensor, meta) -> bool:
    """Whether this step is plain decode on the CPU (module docstring)."""
    return (ENABLED and x.device.type == "cpu" and meta.single_group and meta.lora is None
            and meta.groups[0].decode_pos is not None)


def start(p: LayerPlan, layer: int, micro_batch: int, x: torch.Tensor, meta, cache,
          attn) -> Done | tuple[torch.Tensor, Handle] | None:
    """The whole layer's output (`Done`), or (h, the MoE of norm2(h) on its way) when the experts
    are elsewhere, or None when this step's experts need the Python path (CUDA-graph padding)."""
    if p.experts is not None:
        if p.backend.real_rows is not None:
            return None
        return Done(_whole(p, layer, x, meta, cache, attn))
    h, hn, ids, weights = _attention(p, layer, x, meta, cache, attn)
    return h, p.backend.start(layer, micro_batch, hn, weights, ids)


def _args(p: LayerPlan, layer: int, x: torch.Tensor, meta, cache, attn) -> tuple:
    g = meta.groups[0]
    return (x, p.norm1, p.norm2, p.eps, p.qkv.packed, p.qkv.rows, p.o_proj.packed, p.o_proj.rows, attn.heads,
            attn.kv_heads, meta.cos, meta.sin, cache.k[layer], cache.v[layer], meta.slots, g.ctx_slots, g.decode_pos,
            g.window or 0, attn.head_dim**-0.5, p.gate, p.k)


@timed("layer (native)")
def _whole(p: LayerPlan, layer: int, x: torch.Tensor, meta, cache, attn) -> torch.Tensor:
    counts = p.backend.tokens_per_expert[layer] if p.backend.counting else _NO_COUNTS
    return native.decode_layer(*_args(p, layer, x, meta, cache, attn), p.experts.w13, p.experts.w2,
                               p.experts.intermediate, counts, **p.experts.scales)


@timed("attention (native, with norms and router)")
def _attention(p: LayerPlan, layer: int, x: torch.Tensor, meta, cache, attn) -> list[torch.Tensor]:
    return native.decode_attention_block(*_args(p, layer, x, meta, cache, attn), _NO_COUNTS)


_NO_COUNTS = torch.empty(0, dtype=torch.int64)
