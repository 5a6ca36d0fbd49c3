"""The one place a step's attention metadata is made: index tensors built once per step, read by
every layer (`model.attention.AttentionMetadata`).

Two entry points share one group builder and one slot formula (`kv_cache.slots_of`):

- `from_batch`: any mix of chunks, from the batch's Python lists. Chunks are split into groups
  of one kind (decode chunks of one token, prefill chunks of many) so padding stays small.
- `from_decode`: a decode step staged in persistent device buffers (`decode.DecodeBuffers`):
  every index is computed on the device from the staged integers, nothing is read back, so on
  CUDA the step can be captured as a graph.

Shapes: T new tokens of the step, per group B sequences, Q longest chunk, L longest context.
"""

from __future__ import annotations

import torch

from moe_parallel.contract import StepBatch
from moe_parallel.model import attention
from moe_parallel.model.attention import AttentionMetadata, AttnGroup, visible
from moe_parallel.model.kv_cache import slots_of
from moe_parallel.model.layers import Rotary


def from_batch(batch: StepBatch, block_size: int, window: int | None, rotary: Rotary, dtype: torch.dtype,
               device: torch.device) -> AttentionMetadata:
    chunks = batch.chunks
    for c in chunks:
        if c.end > len(c.block_table) * block_size:
            raise ValueError(f"sequence {c.seq_id}: block table of {len(c.block_table)} blocks "
                             f"cannot hold {c.end} tokens")
    lens = [len(c.token_ids) for c in chunks]
    width = max((len(c.block_table) for c in chunks), default=0)
    ints = dict(dtype=torch.int64, device=device)
    n = torch.tensor(lens, **ints)  # [B]
    start = torch.tensor([c.start for c in chunks], **ints)  # [B]
    tables = torch.tensor([list(c.block_table) + [0] * (width - len(c.block_table)) for c in chunks],
                          **ints).view(len(chunks), width)  # [B, NB]
    seq = torch.repeat_interleave(torch.arange(len(chunks), **ints), n)  # [T] which chunk each token is in
    offsets = n.cumsum(0) - n  # [B] first token of each chunk
    positions = start[seq] + torch.arange(len(seq), **ints) - offsets[seq]  # [T]
    groups = []
    for sel in ([i for i, m in enumerate(lens) if m == 1], [i for i, m in enumerate(lens) if m > 1]):
        if not sel:
            continue
        index = torch.tensor(sel, **ints)
        q_len, ctx_len = max(lens[i] for i in sel), max(chunks[i].end for i in sel)
        groups.append(_group(n[index], start[index], offsets[index], tables[index], q_len, ctx_len, block_size,
                             window, full=_all_attend([chunks[i] for i in sel], ctx_len, window),
                             all_valid=all(lens[i] == q_len for i in sel)))
    cos, sin = rotary.cos_sin(positions, dtype)
    single = len(groups) == 1 and len(set(lens)) == 1  # no padding: outputs need no scatter
    return AttentionMetadata(slots=slots_of(tables, seq, positions, block_size), cos=cos, sin=sin,
                             groups=tuple(groups), single_group=single)


def from_decode(buf, b: int, nb: int, block_size: int, window: int | None, rotary: Rotary,
                dtype: torch.dtype) -> AttentionMetadata:
    """`b` decode rows over `nb` blocks each, from the staged buffers (no host value involved
    but the two sizes)."""
    device = buf.device
    pos = buf.field(1, b)  # [B]
    rows = torch.arange(b, dtype=torch.int64, device=device)
    # every row attends its own context only (the padded blocks' slots are never visible)
    group = _group(None, pos, rows, buf.tables(b, nb), 1, nb * block_size, block_size, window, full=False,
                   all_valid=True)
    cos, sin = rotary.cos_sin(pos, dtype)
    return AttentionMetadata(slots=buf.field(2, b), cos=cos, sin=sin, groups=(group,), single_group=True)


def _group(n: torch.Tensor | None, start: torch.Tensor, offsets: torch.Tensor, tables: torch.Tensor, q_len: int,
           ctx_len: int, block_size: int, window: int | None, full: bool, all_valid: bool) -> AttnGroup:
    """The padded index tensors of one group of B chunks: `n` [B] new tokens each, `start` [B]
    tokens already cached, `offsets` [B] their first token in the step, `tables` [B, NB];
    `full`: every query sees its whole padded context (no mask); `all_valid`: no padding query
    (every chunk has Q tokens; `n` is then not read)."""
    device = tables.device
    q = torch.arange(q_len, dtype=torch.int64, device=device)[None, :]  # [1, Q]
    j = torch.arange(ctx_len, dtype=torch.int64, device=device)  # [L]
    if all_valid:  # no padding: no boolean index (it sizes its output from the data, a host sync)
        valid = torch.ones(tables.shape[0], q_len, dtype=torch.bool, device=device)  # [B, Q]
        token_index = offsets[:, None] + q
        rows = token_index.flatten()
    else:
        valid = q < n[:, None]  # [B, Q]
        token_index = torch.where(valid, offsets[:, None] + q, 0)
        rows = token_index[valid]
    ctx_slots = slots_of(tables, slice(None), j, block_size)  # [B, L]
    decode_pos = start if q_len == 1 else None
    q_pos = start[:, None] + q  # [B, Q]
    if ctx_len > attention.TILE_TOKENS:  # no [B, Q, L] mask: the tiles build theirs
        return AttnGroup(token_index, valid, rows, ctx_slots, None, q_pos, window, all_valid=all_valid,
                         decode_pos=decode_pos)
    if full:
        return AttnGroup(token_index, valid, rows, ctx_slots, None, window=window, all_valid=all_valid,
                         decode_pos=decode_pos)
    mask = visible(j, q_pos[:, :, None], window)  # [B, Q, L]
    if not all_valid:
        mask[:, :, 0] |= ~valid  # padding rows attend somewhere, so softmax stays finite
    return AttnGroup(token_index, valid, rows, ctx_slots, mask[:, None], window=window, all_valid=all_valid,
                     decode_pos=decode_pos)


def _all_attend(chunks, ctx_len: int, window: int | None) -> bool:
    """Whether every query of the group may see its whole padded context (then no mask is needed),
    decided from the chunk lengths on the host rather than by reading the mask back."""
    return all(len(c.token_ids) == 1 and c.end == ctx_len and (window is None or ctx_len <= window) for c in chunks)
