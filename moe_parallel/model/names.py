"""Which checkpoint tensors each kind of worker owns, with the shape each must have.

Attention ranks own the dense part (embeddings, attention, norms, router gates, lm_head);
expert ranks own `experts.E.w{1,2,3}` for their experts only. Names follow the Hub layout of
Mixtral, e.g. `model.layers.3.block_sparse_moe.experts.5.w1.weight`.
"""

from __future__ import annotations

from collections.abc import Iterable

from moe_parallel.model.config import ModelConfig

Shapes = dict[str, tuple[int, ...]]


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_name(layer: int, expert: int, w: str) -> str:
    return f"{layer_prefix(layer)}.block_sparse_moe.experts.{expert}.{w}.weight"


def dense_shapes(c: ModelConfig) -> Shapes:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: Shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = layer_prefix(i)
        shapes |= {
            f"{p}.input_layernorm.weight": (c.hidden_size,),
            f"{p}.self_attn.q_proj.weight": (q, c.hidden_size),
            f"{p}.self_attn.k_proj.weight": (kv, c.hidden_size),
            f"{p}.self_attn.v_proj.weight": (kv, c.hidden_size),
            f"{p}.self_attn.o_proj.weight": (c.hidden_size, q),
            f"{p}.post_attention_layernorm.weight": (c.hidden_size,),
            f"{p}.block_sparse_moe.gate.weight": (c.num_experts, c.hidden_size),
        }
    return shapes


def expert_shapes(c: ModelConfig, experts: Iterable[int]) -> Shapes:
    d, f = c.hidden_size, c.intermediate_size
    shapes: Shapes = {}
    for i in range(c.num_layers):
        for e in experts:
            shapes |= {expert_name(i, e, w): shape for w, shape in (("w1", (f, d)), ("w2", (d, f)), ("w3", (f, d)))}
    return shapes


def all_shapes(c: ModelConfig) -> Shapes:
    return dense_shapes(c) | expert_shapes(c, range(c.num_experts))
