"""Ping-pong micro-batches: attention of one micro-batch while the experts run another.

The step's sequences are split into m micro-batches of about equal token counts (attention is
per sequence, so each micro-batch attends on its own). Per layer, micro-batch by micro-batch,
the attention rank waits for that micro-batch's previous-layer MoE output, computes its
attention and router, and posts its MoE exchanges without waiting (`RemoteExperts.start`):

    attention  | a0 a1 .. | a0 a1 .. |            layer L, then L+1
    experts    |    e0 e1 |    e0 e1 |            (one layer behind, per micro-batch)

so while the expert ranks compute micro-batch i, the attention rank computes micro-batch i+1.
With m = 1 this is exactly the plain forward. Every attention rank of a step uses the same m
(empty micro-batches still exchange, with no rows), so the collectives line up.

Shapes: T tokens of the step, T_i of micro-batch i, D hidden.
"""

from __future__ import annotations

import torch

from moe_parallel.attention import AttentionMetadata
from moe_parallel.batch import SeqChunk
from moe_parallel.dispatch import Pending, RemoteExperts
from moe_parallel.kv_cache import KVCache
from moe_parallel.model import CausalLM
from moe_parallel.profile import section


def split(chunks: tuple[SeqChunk, ...], m: int) -> list[tuple[SeqChunk, ...]]:
    """m contiguous groups of chunks, each near T/m tokens (some may be empty)."""
    total = sum(len(c.token_ids) for c in chunks)
    groups: list[list[SeqChunk]] = [[] for _ in range(m)]
    seen = 0
    for c in chunks:
        middle = seen + len(c.token_ids) / 2  # a chunk goes where its middle token falls
        groups[min(m - 1, int(middle * m / max(total, 1)))].append(c)
        seen += len(c.token_ids)
    return [tuple(g) for g in groups]


def pipelined_forward(model: CausalLM, experts: RemoteExperts, parts: list[tuple[torch.Tensor, AttentionMetadata]],
                      cache: KVCache) -> torch.Tensor:
    """The decoder over micro-batches `parts` [(token ids [T_i], metadata)], final-norm hidden [T, D]."""
    with section("embedding"):
        xs = [model.model.embed_tokens(tokens) for tokens, _ in parts]  # [T_i, D]
    pending: list[tuple[torch.Tensor, Pending] | None] = [None] * len(parts)
    for layer in model.model.layers:
        for i, (_, meta) in enumerate(parts):
            if pending[i] is not None:
                h, moe = pending[i]
                xs[i] = h + moe.wait()
            h = layer.attend(xs[i], meta, cache)
            normed = layer.moe_input(h)
            weights, ids = layer.block_sparse_moe.route(normed)
            pending[i] = (h, experts.start(layer.self_attn.layer, i, normed, weights, ids))
    for i, item in enumerate(pending):
        h, moe = item
        xs[i] = h + moe.wait()
    return model.model.norm(torch.cat(xs))
