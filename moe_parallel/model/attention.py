"""Grouped-query attention over a batch of sequences of different lengths, on a paged KV cache.

Per step the metadata (`step/metadata.py`) turns the batch into index tensors once; every
layer reuses them. Sequences come in groups of one kind (decode chunks of one token, prefill
chunks of many). A decode group runs the native decode kernel on a CPU (K/V read in place
through the slots), else two batched products; a prefill group runs one padded
`scaled_dot_product_attention` with a mask for causality, the sliding window and padding;
a group whose context passes `TILE_TOKENS` is attended tile by tile (online softmax).

Shapes: T new tokens in the step (flattened over sequences), D hidden, H query heads,
G KV heads, Dh head dim; per group B sequences, Q longest chunk, L longest context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_parallel import native
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.kv_cache import KVCache
from moe_parallel.model.layers import apply_rotary, linear
from moe_parallel.model.lora import LoraStep
from moe_parallel.runtime.profile import timed

# Contexts longer than this are attended tile by tile (online softmax): K/V are gathered
# `TILE_TOKENS` positions at a time, so the transient memory of a layer is bounded by the
# batch's queries times the tile, not by B x L_max (at 32k context, the whole-context gather
# of one layer would be B x 32k x G x Dh for K and again for V).
TILE_TOKENS = int(os.environ.get("MOE_SERVE_ATTENTION_TILE", "1024"))  # (set small in tests, to tile short contexts)


@dataclass(frozen=True)
class AttnGroup:
    token_index: torch.Tensor  # [B, Q] index into the step's T tokens (padding -> 0)
    valid: torch.Tensor  # [B, Q] real query rows
    rows: torch.Tensor  # [n_valid] token_index[valid]: where the group's outputs go
    ctx_slots: torch.Tensor  # [B, L] KV slots of each sequence's context (padding -> 0)
    mask: torch.Tensor | None  # [B, 1, Q, L] True where a query may attend; None when all may (or tiled)
    q_pos: torch.Tensor | None = None  # [B, Q] each query's position (tiled contexts build masks per tile)
    window: int | None = None
    all_valid: bool = False  # every (B, Q) is a real query (decode): outputs are taken without a mask
    decode_pos: torch.Tensor | None = None  # [B] the query's position, in groups of one query per sequence

    @property
    def tiled(self) -> bool:
        return self.q_pos is not None


@dataclass(frozen=True)
class AttentionMetadata:
    slots: torch.Tensor  # [T] where each new token's K and V are written
    cos: torch.Tensor  # [T, Dh]
    sin: torch.Tensor  # [T, Dh]
    groups: tuple[AttnGroup, ...]
    single_group: bool  # one group covering every token in order: its output needs no scatter
    lora: LoraStep | None = None  # the step's LoRA adapters, if any of its sequences uses one


def native_attention(q: torch.Tensor) -> bool:
    """Native kernels for `q`'s step (decode attention, RoPE + cache write): float32 or bfloat16
    on a CPU, where they are built."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and native.available()


def visible(j: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which context positions `j` a query at `q_pos` may attend (broadcast): causal, and within
    the sliding window when there is one."""
    allowed = j <= q_pos
    return allowed if window is None else allowed & (q_pos - j < window)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.split = (q, kv, kv)
        # q, k and v stacked: the three projections are one product (loaded as three slices)
        self.qkv = nn.Parameter(torch.empty(q + 2 * kv, c.hidden_size))
        self.o_proj = nn.Linear(q, c.hidden_size, bias=False)

    def projections(self) -> dict:
        """The checkpoint's q_proj, k_proj and v_proj: slices of `qkv`, or sinks that quantize
        them into its rows when `qkv` is a quantized matrix."""
        names = ("q_proj", "k_proj", "v_proj")
        if isinstance(self.qkv, torch.Tensor):
            return dict(zip(names, self.qkv.split(self.split), strict=True))
        from moe_parallel.model.quant import QuantSink

        starts = [sum(self.split[:i]) for i in range(3)]
        return {name: QuantSink(self.qkv, start, (n, self.qkv.cols))
                for name, start, n in zip(names, starts, self.split, strict=True)}

    @timed("attention")
    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        qkv = linear(x, self.qkv)
        if meta.lora is not None:
            qkv = meta.lora.add_qkv(self.layer, x, qkv, self.split)
        if native_attention(qkv):  # RoPE and the cache write in one native call (CPU)
            q = native.rotary_cache_write(qkv.contiguous(), self.heads, self.kv_heads, meta.cos, meta.sin,
                                          cache.k[self.layer], cache.v[self.layer], meta.slots)  # [T, H, Dh]
        else:
            q, k, v = qkv.split(self.split, dim=-1)
            q = apply_rotary(q.reshape(t, self.heads, self.head_dim), meta.cos, meta.sin)  # [T, H, Dh]
            k = apply_rotary(k.reshape(t, self.kv_heads, self.head_dim), meta.cos, meta.sin)  # [T, G, Dh]
            cache.write(self.layer, meta.slots, k, v.reshape(t, self.kv_heads, self.head_dim))
        if meta.single_group:
            out = self._attend(q, meta.groups[0], cache)
        else:
            out = torch.empty_like(q)
            for g in meta.groups:
                out[g.rows] = self._attend(q, g, cache)
        out = out.reshape(t, self.heads * self.head_dim)
        if meta.lora is None:
            return linear(out, self.o_proj.weight)
        return meta.lora.add(self.layer, "o_proj", out, linear(out, self.o_proj.weight))

    def _attend(self, q: torch.Tensor, g: AttnGroup, cache: KVCache) -> torch.Tensor:
        if g.decode_pos is not None and native_attention(q):  # one call, K/V read in place through the slots
            return native.decode_attention(q.index_select(0, g.rows), cache.k[self.layer], cache.v[self.layer],
                                           g.ctx_slots, g.decode_pos, g.window or 0)
        if g.tiled:
            return self._attend_tiled(q, g, cache)
        k, v = cache.gather(self.layer, g.ctx_slots)  # [B, L, G, Dh]
        if g.token_index.shape[1] == 1:
            return self._attend_decode(q.index_select(0, g.rows), k, v, g.mask)
        qg = q[g.token_index].transpose(1, 2)  # [B, H, Q, Dh]
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=g.mask,
                                           enable_gqa=True)  # [B, H, Q, Dh]
        return o.transpose(1, 2)[g.valid]  # [n_valid, H, Dh]

    def _attend_tiled(self, q: torch.Tensor, g: AttnGroup, cache: KVCache) -> torch.Tensor:
        """Long contexts: K/V read `TILE_TOKENS` positions at a time through the slots, scores
        and an online softmax per tile (running max, sum and output in float32). GQA without
        repeating K/V: the query heads of each KV head and the queries are one row dimension
        (R = H/G x Q), so each product is [R, Dh] x [Dh, t] per sequence and KV head."""
        qg = q[g.token_index]  # [B, Q, H, Dh]
        b, ql, h, d = qg.shape
        kv, per = self.kv_heads, self.heads // self.kv_heads
        qg = qg.view(b, ql, kv, per, d).permute(0, 2, 3, 1, 4).reshape(b, kv, per * ql, d)  # [B, G, R, Dh]
        best = torch.full((b, kv, per * ql, 1), float("-inf"), device=q.device)
        total = torch.zeros_like(best)
        acc = torch.zeros(b, kv, per * ql, d, device=q.device)
        q_pos = g.q_pos[:, None, None, :, None]  # [B, 1, 1, Q, 1]
        first = ~g.valid[:, None, None, :, None]  # padding rows attend position 0, so softmax stays finite
        length = g.ctx_slots.shape[1]
        for s in range(0, length, TILE_TOKENS):
            k, v = cache.gather(self.layer, g.ctx_slots[:, s:s + TILE_TOKENS])  # [B, t, G, Dh]
            t = k.shape[1]
            j = torch.arange(s, s + t, device=q.device)  # [t]
            allowed = visible(j, q_pos, g.window)  # [B, 1, 1, Q, t]
            if s == 0:
                allowed = allowed | (first & (j == 0))
            allowed = allowed.expand(b, 1, per, ql, t).reshape(b, 1, per * ql, t)
            scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * d**-0.5  # [B, G, R, t]
            scores = scores.masked_fill(~allowed, float("-inf"))
            new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(new_best), 0.0, new_best)  # a tile all masked for a row: no NaN
            probs = torch.exp(scores - safe)
            scale = torch.exp(best - safe)
            total = total * scale + probs.sum(-1, keepdim=True)
            acc = acc * scale + torch.matmul(probs.to(v.dtype), v.transpose(1, 2)).float()  # [B, G, R, Dh]
            best = new_best
        out = (acc / total).to(q.dtype).view(b, kv, per, ql, d).permute(0, 3, 1, 2, 4)
        if g.all_valid:  # a boolean mask would size its output from the data: a host sync
            return out.reshape(b * ql, h, d)
        return out.reshape(b, ql, h, d)[g.valid]  # [n_valid, H, Dh]

    def _attend_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """One query per sequence: two batched products beat the fused kernel at decode sizes."""
        b, length, g, d = k.shape
        qg = q.view(b, g, self.heads // g, d)  # [B, G, H/G, Dh]: query heads grouped by their KV head
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * d**-0.5  # [B, G, H/G, L]
        if mask is not None:
            scores = scores.masked_fill(~mask.view(b, 1, 1, length), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return torch.matmul(probs, v.transpose(1, 2)).view(b, self.heads, d)  # [B, H, Dh]
