"""Greedy generation driven step by step over one or more attention ranks.

This is the offline path used by parity tests and benchmarks: every prompt is prefilled in
one step (all positions' logits kept), then all sequences decode together. Sequence i runs on
attention rank i % ranks; each rank's KV blocks are handed out contiguously. The serving
engine replaces this with its scheduler and block manager.

`step` takes one `StepBatch` per attention rank and returns each rank's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moe_parallel.contract import SeqChunk, StepBatch

StepFn = Callable[[list[StepBatch]], list[torch.Tensor]]


@dataclass
class _Seq:
    seq_id: int
    tokens: list[int]
    blocks: tuple[int, ...]
    cached: int = 0


@dataclass(frozen=True)
class GreedyResult:
    prompt_logits: list[torch.Tensor]  # [L_i, V] per prompt
    tokens: list[list[int]]  # generated ids per prompt


def greedy(step: StepFn, prompts: Sequence[Sequence[int]], steps: int, ranks: int = 1,
           block_size: int = 16, micro_batches: int = 1) -> GreedyResult:
    seqs, next_block = [], [0] * ranks
    for i, p in enumerate(prompts):
        n = -(-(len(p) + steps) // block_size)
        r = i % ranks
        seqs.append(_Seq(i, list(p), tuple(range(next_block[r], next_block[r] + n))))
        next_block[r] += n
    logits = _run(step, seqs, ranks, all_logits=True, micro_batches=micro_batches)
    prompt_logits = [logits[s.seq_id] for s in seqs]
    out = [[] for _ in seqs]
    for _ in range(steps):
        for s in seqs:
            tok = int(logits[s.seq_id][-1].argmax())
            s.tokens.append(tok)
            out[s.seq_id].append(tok)
        logits = _run(step, seqs, ranks, all_logits=False, micro_batches=micro_batches)
    return GreedyResult(prompt_logits, out)


def _run(step: StepFn, seqs: list[_Seq], ranks: int, all_logits: bool,
         micro_batches: int = 1) -> dict[int, torch.Tensor]:
    per_rank = [[s for s in seqs if s.seq_id % ranks == r] for r in range(ranks)]
    batches = [StepBatch(tuple(SeqChunk(s.seq_id, tuple(s.tokens[s.cached:]), s.cached, s.blocks) for s in group),
                         all_logits=all_logits, micro_batches=micro_batches) for group in per_rank]
    results = step(batches)
    out = {}
    for group, batch, logits in zip(per_rank, batches, results, strict=True):
        rows = torch.split(logits, [len(c.token_ids) for c in batch.chunks]) if all_logits else logits.unbind(0)
        for s, row in zip(group, rows, strict=True):
            out[s.seq_id] = row if all_logits else row[None]
            s.cached = len(s.tokens)
    return out
