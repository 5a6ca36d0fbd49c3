"""Decode steps driven directly (no scheduler), for step times, layouts and profiles.

`decode_run(execute, batch, prompt_len, steps)` prefills `batch` random prompts, then times
`steps` greedy decode steps. `execute` takes one `StepBatch` per attention rank and returns
each rank's sampled tokens (the runner's or an actor's `execute`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from moe_parallel.contract import SamplingParams, SeqChunk, StepBatch

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


def decode_run(execute: Callable[[list[StepBatch]], list], batch: int, prompt_len: int, steps: int,
               ranks: int = 1, block_size: int = 16, warmup: int = 2, vocab: int = 32000,
               on_timed: Callable[[], None] = lambda: None, micro_batches: int = 1) -> float:
    """Mean seconds per decode step; `on_timed` runs just before the timed steps (after the
    prefill and the warm-up steps), e.g. to start a profile that covers exactly those."""
    g = torch.Generator().manual_seed(0)
    blocks = -(-(prompt_len + steps + warmup + 1) // block_size)
    seqs = [{"id": i, "rank": i % ranks, "done": 0,
             "tokens": [1, *torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist()],
             "blocks": tuple(range((i // ranks) * blocks, (i // ranks + 1) * blocks))} for i in range(batch)]

    def step() -> None:
        batches = []
        for r in range(ranks):
            mine = [s for s in seqs if s["rank"] == r]
            chunks = [SeqChunk(s["id"], tuple(s["tokens"][s["done"]:]), s["done"], s["blocks"], GREEDY, prompt_len,
                               s["id"]) for s in mine]
            batches.append(StepBatch(tuple(chunks), micro_batches=micro_batches))
        outs = execute(batches)
        for r, out in enumerate(outs):
            by_id = {o.seq_id: o.token_id for o in out}
            for s in seqs:
                if s["rank"] == r:
                    s["done"] = len(s["tokens"])
                    s["tokens"].append(by_id[s["id"]])

    step()  # prefill
    for _ in range(warmup):
        step()
    on_timed()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps
