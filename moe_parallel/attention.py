"""Grouped-query attention over a batch of sequences of different lengths, on a paged KV cache.

Per step, `AttentionMetadata.build` turns the batch into index tensors once; every layer
reuses them. Sequences are split into groups of equal kind (decode chunks of one token,
prefill chunks of many) so that padding stays small, and each group runs as one padded
`scaled_dot_product_attention` call with a mask that encodes causality, the sliding window
and padding.

Shapes: T new tokens in the step (flattened over sequences), D hidden, H query heads,
G KV heads, Dh head dim; per group B sequences, Q longest chunk, L longest context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel.batch import SeqChunk, StepBatch
from moe_parallel.config import ModelConfig
from moe_parallel.kv_cache import KVCache
from moe_parallel.rope import Rotary, apply_rotary


@dataclass(frozen=True)
class AttnGroup:
    token_index: torch.Tensor  # [B, Q] index into the step's T tokens (padding -> 0)
    valid: torch.Tensor  # [B, Q] real query rows
    ctx_slots: torch.Tensor  # [B, L] KV slots of each sequence's context (padding -> 0)
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend


@dataclass(frozen=True)
class AttentionMetadata:
    slots: torch.Tensor  # [T] where each new token's K and V are written
    cos: torch.Tensor  # [T, Dh]
    sin: torch.Tensor  # [T, Dh]
    groups: tuple[AttnGroup, ...]

    @classmethod
    def build(cls, batch: StepBatch, block_size: int, window: int | None, rotary: Rotary,
              dtype: torch.dtype) -> AttentionMetadata:
        empty = [torch.zeros(0, dtype=torch.int64)]  # an attention rank may have nothing to run this step
        positions = torch.cat(empty + [torch.arange(c.start, c.end) for c in batch.chunks])
        slots = torch.cat(empty + [_slots(c, c.start, c.end, block_size) for c in batch.chunks])
        offsets = _offsets(batch.chunks)
        decode = [i for i, c in enumerate(batch.chunks) if len(c.token_ids) == 1]
        prefill = [i for i, c in enumerate(batch.chunks) if len(c.token_ids) > 1]
        groups = tuple(_group([batch.chunks[i] for i in idx], [offsets[i] for i in idx], block_size, window)
                       for idx in (decode, prefill) if idx)
        cos, sin = rotary.cos_sin(positions, dtype)
        return cls(slots=slots, cos=cos, sin=sin, groups=groups)


def _slots(chunk: SeqChunk, start: int, end: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(chunk.block_table, dtype=torch.int64)
    if end > len(chunk.block_table) * block_size:
        raise ValueError(f"sequence {chunk.seq_id}: block table of {len(chunk.block_table)} blocks "
                         f"cannot hold {end} tokens")
    return table[pos // block_size] * block_size + pos % block_size


def _offsets(chunks: tuple[SeqChunk, ...]) -> list[int]:
    out, total = [], 0
    for c in chunks:
        out.append(total)
        total += len(c.token_ids)
    return out


def _group(chunks: list[SeqChunk], offsets: list[int], block_size: int, window: int | None) -> AttnGroup:
    q_len = max(len(c.token_ids) for c in chunks)
    ctx_len = max(c.end for c in chunks)
    b = len(chunks)
    token_index = torch.zeros(b, q_len, dtype=torch.int64)
    valid = torch.zeros(b, q_len, dtype=torch.bool)
    ctx_slots = torch.zeros(b, ctx_len, dtype=torch.int64)
    mask = torch.zeros(b, 1, q_len, ctx_len, dtype=torch.bool)
    j = torch.arange(ctx_len)
    for row, (c, off) in enumerate(zip(chunks, offsets, strict=True)):
        n = len(c.token_ids)
        token_index[row, :n] = torch.arange(off, off + n)
        valid[row, :n] = True
        ctx_slots[row, : c.end] = _slots(c, 0, c.end, block_size)
        q_pos = torch.arange(c.start, c.end)[:, None]  # [n, 1]
        allowed = j[None, :] <= q_pos
        if window is not None:
            allowed &= q_pos - j[None, :] < window
        mask[row, 0, :n] = allowed
    mask[:, 0, :, 0] |= ~valid  # padding rows attend somewhere, so softmax stays finite
    return AttnGroup(token_index=token_index, valid=valid, ctx_slots=ctx_slots, mask=mask)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.heads, self.head_dim), meta.cos, meta.sin)  # [T, H, Dh]
        k = apply_rotary(self.k_proj(x).view(t, self.kv_heads, self.head_dim), meta.cos, meta.sin)  # [T, G, Dh]
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        cache.write(self.layer, meta.slots, k, v)
        out = torch.empty_like(q)
        for g in meta.groups:
            out[g.token_index[g.valid]] = self._attend(q, g, cache)
        return self.o_proj(out.view(t, -1))

    def _attend(self, q: torch.Tensor, g: AttnGroup, cache: KVCache) -> torch.Tensor:
        k, v = cache.gather(self.layer, g.ctx_slots)  # [B, L, G, Dh]
        qg = q[g.token_index].transpose(1, 2)  # [B, H, Q, Dh]
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=g.mask,
                                           enable_gqa=True)  # [B, H, Q, Dh]
        return o.transpose(1, 2)[g.valid]  # [n_valid, H, Dh]
