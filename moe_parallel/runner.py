"""One attention rank's forward step: batch metadata in, logits out.

The runner owns the model's dense part and the KV cache tensors; the block tables come with
each batch from whoever schedules it. After every step it calls `after_step` (in the
`disaggregated` layout: tell the expert ranks the step is over).

Shapes: T tokens in the step, B chunks, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_parallel.attention import AttentionMetadata
from moe_parallel.batch import StepBatch
from moe_parallel.kv_cache import KVCache
from moe_parallel.model import CausalLM
from moe_parallel.profile import section
from moe_parallel.rope import Rotary
from moe_parallel.sampler import SampleOutput, Sampler


class ModelRunner:
    def __init__(self, model: CausalLM, cache: KVCache, after_step: Callable[[], None] | None = None,
                 in_group: bool = False):
        c = model.config
        self.model, self.cache = model, cache
        # Ranks in a communication group run every step, even with nothing to compute, so the
        # collectives line up; a lone rank skips empty steps.
        self.needs_empty_steps = in_group
        self.after_step = after_step or (lambda: None)
        self.rotary = Rotary(c.head_dim, c.rope_theta)
        self.dtype = model.lm_head.weight.dtype
        self.sampler = Sampler(c.eos_token_ids)

    def execute(self, batch: StepBatch) -> list[SampleOutput]:
        """Run the step and sample the next token of every chunk that asks for one."""
        self.sampler.drop(batch.finished)
        for c in batch.chunks:
            self.sampler.observe(c)
        if not batch.chunks and not self.needs_empty_steps:
            return []
        rows = [i for i, c in enumerate(batch.chunks) if c.sampling is not None]
        logits = self.step(batch, rows)
        with section("sampling"):
            return self.sampler(logits, [batch.chunks[i] for i in rows]) if rows else []

    def expert_token_counts(self) -> list[list[int]]:
        """[layer][expert] tokens routed so far, where this rank computes the experts itself."""
        experts = getattr(self.model.model.layers[0].block_sparse_moe, "experts", None)
        counts = getattr(experts, "tokens_per_expert", None)
        return [] if counts is None else counts.tolist()

    @torch.inference_mode()
    def step(self, batch: StepBatch, rows: list[int] | None = None) -> torch.Tensor:
        """Logits in float32: [B, V] for each chunk's last token (only chunks `rows` when given),
        or [T, V] with `all_logits`."""
        with section("metadata"):
            meta = AttentionMetadata.build(batch, self.cache.block_size, self.model.config.sliding_window,
                                           self.rotary, self.dtype)
        tokens = torch.tensor([t for c in batch.chunks for t in c.token_ids], dtype=torch.int64)
        hidden = self.model(tokens, meta, self.cache)  # [T, D]
        if not batch.all_logits:
            last = torch.tensor([len(c.token_ids) for c in batch.chunks], dtype=torch.int64).cumsum(0) - 1
            hidden = hidden.index_select(0, last if rows is None else last[rows])  # [B, D]
        with section("lm_head"):
            logits = self.model.logits(hidden).float()
        with section("dispatch"):
            self.after_step()
        return logits
