"""One attention rank's forward step: batch metadata in, logits out, on the rank's device.

The runner owns the model's dense part, the KV cache tensors and the sampler, all on one
device; the block tables come with each batch from whoever schedules it. After every step it
calls `after_step` (in the `disaggregated` layout: tell the expert ranks the step is over).
`allocate_cache` sizes the KV pool (see `cache_size.py`) by dummy steps that measure the
activation peak, allocates it, and on a GPU captures the decode graphs (`decode.py`).

Shapes: T tokens in the step, B chunks, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from itertools import accumulate

import torch

from moe_parallel.contract import SampleOutput, SeqChunk, StepBatch
from moe_parallel.model.attention import AttentionMetadata
from moe_parallel.model.decoder import CausalLM
from moe_parallel.model.experts import FloatExperts
from moe_parallel.model.kv_cache import KVCache
from moe_parallel.model.layers import Rotary
from moe_parallel.model.lora import LoraError, LoraSlots, LoraStep
from moe_parallel.model.moe import ExpertsBackend, LocalExperts
from moe_parallel.runtime import compute
from moe_parallel.runtime.devices import enter_thread
from moe_parallel.runtime.profile import section
from moe_parallel.sampling.sampler import Sampler, score_prompts
from moe_parallel.step import metadata
from moe_parallel.step.cache_size import CacheSpec, check_fits, kv_blocks
from moe_parallel.step.decode import BATCH_BUCKETS, DecodeStep, is_plain_decode

log = logging.getLogger(__name__)


def split(chunks: tuple[SeqChunk, ...], m: int) -> list[tuple[SeqChunk, ...]]:
    """m contiguous groups of chunks (ping-pong micro-batches), each near T/m tokens (some may be
    empty: every attention rank of a step uses the same m, so the exchanges line up)."""
    total = sum(len(c.token_ids) for c in chunks)
    groups: list[list[SeqChunk]] = [[] for _ in range(m)]
    seen = 0
    for c in chunks:
        middle = seen + len(c.token_ids) / 2  # a chunk goes where its middle token falls
        groups[min(m - 1, int(middle * m / max(total, 1)))].append(c)
        seen += len(c.token_ids)
    return [tuple(g) for g in groups]


class ModelRunner:
    """`experts` is the backend the builder chose, attached to every layer here: `LocalExperts`,
    `RemoteExperts`, or None where the MoE block brings its own (`colocated`)."""

    def __init__(self, model: CausalLM, cache: KVCache | None, experts: ExpertsBackend | None,
                 after_step: Callable[..., None] | None = None, in_group: bool = False,
                 device: torch.device | None = None, tokenizer_dir: str | None = None, enforce_eager: bool = False):
        c = model.config
        self.model, self.cache, self.experts = model, cache, experts
        if experts is not None:
            model.attach_experts(experts)
        self.device = device or model.model.embed_tokens.weight.device
        # Ranks in a communication group run every step, even with nothing to compute, so the
        # collectives line up; a lone rank skips empty steps.
        self.needs_empty_steps = in_group
        self.after_step = after_step or (lambda warmup=False: None)
        self.rotary = Rotary(c.head_dim, c.rope_theta, self.device)
        self.dtype = model.model.embed_tokens.weight.dtype
        self.sampler = Sampler(c.eos_token_ids, self.device, tokenizer_dir, c.vocab_size)
        self.lora: LoraSlots | None = None
        # Decode steps run on persistent buffers (decode.py); with CUDA graphs on a CUDA device
        # where the experts are local, unless `enforce_eager`. Made with the KV cache.
        self.enforce_eager = enforce_eager
        self.decode: DecodeStep | None = None

    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        """Room for `max_loras` resident adapters of rank up to `max_rank` (attention projections)."""
        self.lora = LoraSlots(self.model.config, max_loras, max_rank, self.dtype, self.device)

    def allocate_cache(self, spec: CacheSpec, max_model_len: int) -> int:
        """Size the KV pool, refuse it if one longest sequence cannot fit, allocate it, capture
        the decode graphs (GPU); returns its blocks."""
        c = self.model.config
        blocks = kv_blocks(spec, c, self.dtype, self.device, lambda: self._peak_step(spec, max_model_len))
        check_fits(blocks, spec.block_size, max_model_len)
        self.attach_cache(KVCache(c.num_layers, blocks, spec.block_size, c.num_kv_heads, c.head_dim, self.dtype,
                                  self.device), max_model_len)
        if self.decode.graphs:
            self.decode.capture_ladder(self.cache)
        return blocks

    def attach_cache(self, cache: KVCache, max_model_len: int) -> None:
        """Use `cache` (made by `allocate_cache`, or by a benchmark) and set up the decode path."""
        self.cache = cache
        self.decode = DecodeStep(self.model, self.rotary, self.dtype, self.device,
                                 max_blocks=-(-max_model_len // cache.block_size), graphs=self.graphs_possible(),
                                 experts=self.local_experts())

    def local_experts(self) -> LocalExperts | None:
        """The experts backend when it runs in this process, else None."""
        return self.experts if isinstance(self.experts, LocalExperts) else None

    def graphs_possible(self) -> bool:
        """CUDA graphs for decode: on a CUDA device, not `enforce_eager`, float experts in this
        process run as grouped products (bfloat16 on CUDA, compute capability 9.0+; the
        per-expert loop reads its counts back, and a remote expert call needs its split sizes
        on the host)."""
        experts = self.local_experts()
        return (self.device.type == "cuda" and not self.enforce_eager and self.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(self.device) >= (9, 0)  # grouped products without a sync
                and experts is not None and all(type(g) is FloatExperts for g in experts.groups))

    def _peak_step(self, spec: CacheSpec, max_model_len: int) -> int:
        """Bytes the dummy steps need at their peak: on CUDA the allocator's peak, plus as much
        again as the decode step's own for the graph pool, which the captures fill later (on a
        CPU the steps run as a warm-up; 0)."""
        self.dummy_step(spec, max_model_len)
        if self.device.type != "cuda":
            return 0
        peak = torch.cuda.max_memory_allocated(self.device)
        if self.graphs_possible():
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.dummy_step(spec, max_model_len, prefill=False)
            peak += torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        return peak

    def dummy_step(self, spec: CacheSpec, max_model_len: int | None = None, prefill: bool = True) -> None:
        """The largest steps the scheduler can send, on a scratch cache dropped afterwards: a
        prefill of `max_num_batched_tokens` tokens, then a decode of the largest batch bucket
        over that context (every rank of a group runs them together). The experts' token
        counts leave them out."""
        c, n = self.model.config, spec.max_num_batched_tokens
        blocks = -(-n // spec.block_size)
        self.cache = KVCache(c.num_layers, blocks, spec.block_size, c.num_kv_heads, c.head_dim, self.dtype,
                             self.device)
        table = tuple(range(blocks))
        if prefill:
            self.step(StepBatch((SeqChunk(-1, (0,) * n, 0, table),)), warmup=True)
        if self.device.type == "cuda":  # decode-sized activations and sampler buffers matter on a card
            decode = DecodeStep(self.model, self.rotary, self.dtype, self.device, max_blocks=blocks,
                                experts=self.local_experts())
            rows = [SeqChunk(-1 - i, (0,), n - 1, table) for i in range(BATCH_BUCKETS[-1])]
            with torch.inference_mode(), self._uncounted():
                decode(rows, self.cache)
            self.after_step(warmup=True)
        self.cache = None

    def execute(self, batch: StepBatch) -> list[SampleOutput]:
        """Run the step and sample the next token of every chunk that asks for one."""
        enter_thread()
        self.sampler.drop(batch.finished)
        for name in batch.drop_loras:
            if self.lora is not None:
                self.lora.drop(name)
        batch, failed = self._load_loras(batch)
        for c in batch.chunks:
            self.sampler.observe(c)
        failed += self.sampler.prepare(batch.chunks)  # grammar matchers build while the step runs
        if failed:
            bad = {o.seq_id for o in failed}
            batch = replace(batch, chunks=tuple(c for c in batch.chunks if c.seq_id not in bad))
        if not batch.chunks and not self.needs_empty_steps:
            return failed
        rows = [i for i, c in enumerate(batch.chunks) if c.sampling is not None]
        scored = [c for c in batch.chunks if c.scored]
        logits = self.step(batch, rows, score=bool(scored))
        with section("sampling"), compute.burst():
            sampled = self._sample(logits[: len(rows)], [batch.chunks[i] for i in rows]) if rows else []
            if scored:
                sampled = _merge_scores(sampled, score_prompts(logits[len(rows):], scored))
            return sampled + failed

    def _load_loras(self, batch: StepBatch) -> tuple[StepBatch, list[SampleOutput]]:
        """Make the step's adapters resident; the chunks of one that cannot be loaded leave the
        step, each with its error (their requests fail; every other sequence runs)."""
        wanted = {c.lora for c in batch.chunks if c.lora}
        if not wanted:
            return batch, []
        paths = dict(batch.loras)
        if self.lora is None:
            failed = {name: "this model instance was started without LoRA support" for name in wanted}
        else:
            failed = self.lora.ensure({name: paths[name] for name in wanted})
        if not failed:
            return batch, []
        errors = [SampleOutput(c.seq_id, -1, error=failed[c.lora]) for c in batch.chunks if c.lora in failed]
        return replace(batch, chunks=tuple(c for c in batch.chunks if c.lora not in failed)), errors

    def _sample(self, logits: torch.Tensor, chunks: list[SeqChunk]) -> list[SampleOutput]:
        """Sample the batch; if that fails, row by row, so one sequence's failure is its own."""
        try:
            return self.sampler(logits, chunks)
        except Exception:
            log.exception("batched sampling failed; sampling row by row")
        outs = []
        for i, c in enumerate(chunks):
            try:
                outs += self.sampler(logits[i : i + 1], [c])
            except Exception as exc:
                outs.append(SampleOutput(c.seq_id, -1, error=f"{type(exc).__name__}: {exc}"))
        return outs

    def _inputs(self, batch: StepBatch) -> tuple[torch.Tensor, AttentionMetadata]:
        with section("metadata"):
            meta = metadata.from_batch(batch, self.cache.block_size, self.model.config.sliding_window,
                                       self.rotary, self.dtype, self.device)
            tokens = torch.tensor([t for c in batch.chunks for t in c.token_ids], dtype=torch.int64,
                                  device=self.device)
            if any(c.lora for c in batch.chunks):
                meta = replace(meta, lora=self._lora_step(batch))
        return tokens, meta

    def _lora_step(self, batch: StepBatch) -> LoraStep:
        """Which token rows run with which resident adapter (made resident by `_load_loras`)."""
        if self.lora is None:
            raise LoraError("this model instance was started without LoRA support (no lora_modules)")
        rows: dict[int, list[int]] = {}
        start = 0
        for c in batch.chunks:
            if c.lora:
                rows.setdefault(self.lora.slot_of[c.lora], []).extend(range(start, start + len(c.token_ids)))
            start += len(c.token_ids)
        return LoraStep(self.lora, [(slot, torch.tensor(r, dtype=torch.int64, device=self.device))
                                    for slot, r in rows.items()])

    def expert_token_counts(self) -> list[list[int]]:
        """[layer][expert] tokens routed so far, where this rank computes the experts itself."""
        experts = self.local_experts()
        return [] if experts is None else experts.tokens_per_expert.tolist()

    @torch.inference_mode()
    def step(self, batch: StepBatch, rows: list[int] | None = None, score: bool = False,
             warmup: bool = False) -> torch.Tensor:
        """Logits in float32: [B, V] for each chunk's last token (only chunks `rows` when given),
        or [T, V] with `all_logits`. With `score`, the logits of every scored prompt position
        (`SeqChunk.scored`, chunk by chunk) follow those rows. A `warmup` step is left out of
        the experts' token counts."""
        enter_thread()
        if warmup:
            return self._warmup_step(batch)
        logits = None
        if (self.decode is not None and not score and (rows is None or len(rows) == len(batch.chunks))
                and is_plain_decode(batch)):
            logits = self.decode(list(batch.chunks), self.cache)  # None: the step does not fit that path
        if logits is None:
            logits = self._forward(batch, rows, score)
        with section("dispatch"):
            self.after_step()
        return logits

    def _warmup_step(self, batch: StepBatch) -> torch.Tensor:
        with self._uncounted():
            logits = self._forward(batch, None, False)
        self.after_step(warmup=True)
        return logits

    def _uncounted(self):
        """Steps that are not traffic (sizing, warm-up, graph capture) stay out of the counts."""
        experts = self.local_experts()
        return contextlib.nullcontext() if experts is None else experts.uncounted()

    def _forward(self, batch: StepBatch, rows: list[int] | None, score: bool) -> torch.Tensor:
        """The general path: any mix of chunks, metadata built from the batch on the host."""
        if batch.micro_batches == 1:
            parts = [self._inputs(batch)]
        else:
            parts = [self._inputs(replace(batch, chunks=g)) for g in split(batch.chunks, batch.micro_batches)]
        hidden = self.model.run(parts, self.cache)  # [T, D]
        if not batch.all_logits:
            last = [end - 1 for end in accumulate(len(c.token_ids) for c in batch.chunks)]
            keep = last if rows is None else [last[i] for i in rows]
            if score:
                starts = [end - len(c.token_ids) for end, c in zip(
                    accumulate(len(c.token_ids) for c in batch.chunks), batch.chunks, strict=True)]
                keep += [p for s, c in zip(starts, batch.chunks, strict=True) for p in range(s, s + c.scored)]
            hidden = hidden.index_select(0, torch.tensor(keep, dtype=torch.int64, device=self.device))  # [B, D]
        return self.model.logits(hidden)


def _merge_scores(sampled: list[SampleOutput], scores: list[SampleOutput]) -> list[SampleOutput]:
    """Attach each chunk's prompt logprobs to its sampled token, or send them on their own
    (`sampled=False`) for a prefill chunk that samples nothing yet."""
    by_seq = {o.seq_id: o for o in scores}
    out = []
    for o in sampled:
        score = by_seq.pop(o.seq_id, None)
        out.append(o if score is None else
                   replace(o, prompt_logprobs=score.prompt_logprobs, prompt_start=score.prompt_start))
    return out + list(by_seq.values())
