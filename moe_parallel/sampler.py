"""Sampling on the attention rank: logits in, one token (and its logprobs) per sequence out.

Runs where the logits are, so only token ids cross the network. Per sequence it keeps the
tokens it has seen (for penalties) and its own `torch.Generator`, seeded from the request:
a sequence's random draws never depend on which other sequences share its batch, so a seeded
request gives the same tokens in any batch. The state survives preemption (the KV cache is
recomputed, the sampler state is not touched) and is dropped when the engine says so.

Order of operations, as in vLLM: penalties (repetition on prompt and output, presence and
frequency on output) -> min_tokens (stop ids masked) -> greedy argmax, or temperature ->
top-k -> top-p -> min-p -> one inverse-CDF draw from the sequence's generator. Logprobs are
those of the raw model distribution.

Shapes: B sequences sampled this step, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_parallel.batch import SeqChunk


@dataclass(frozen=True)
class SampleOutput:
    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass
class _SeqState:
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos = eos_token_ids
        self.states: dict[int, _SeqState] = {}

    def drop(self, seq_ids: tuple[int, ...]) -> None:
        for s in seq_ids:
            self.states.pop(s, None)

    def observe(self, chunk: SeqChunk) -> None:
        """Record the chunk's tokens (each position once, even when a preempted sequence reruns)."""
        state = self.states.get(chunk.seq_id)
        if state is None:
            state = self.states[chunk.seq_id] = _SeqState(torch.Generator(device="cpu").manual_seed(chunk.seed))
        known = len(state.tokens)
        if chunk.end > known:
            state.tokens.extend(chunk.token_ids[known - chunk.start:])

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, chunks: list[SeqChunk]) -> list[SampleOutput]:
        logits = logits.float().cpu()
        params = [c.sampling for c in chunks]
        raw = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        x = logits
        if any(p.has_penalties or p.min_tokens for p in params):  # only then are logits edited
            x = self._penalise(logits.clone(), chunks)
            self._mask_early_stop(x, chunks)
        tokens = self._choose(x, chunks)
        return [self._output(c, int(t), raw[i] if raw is not None else None) for i, (c, t) in
                enumerate(zip(chunks, tokens.tolist(), strict=True))]

    def _penalise(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        for i, c in enumerate(chunks):
            p = c.sampling
            if not p.has_penalties:
                continue
            seen = self.states[c.seq_id].tokens
            out = torch.bincount(torch.tensor(seen[c.prompt_len:], dtype=torch.int64), minlength=x.shape[1])
            if p.repetition_penalty != 1.0:
                used = (out > 0) | (torch.bincount(torch.tensor(seen[: c.prompt_len], dtype=torch.int64),
                                                   minlength=x.shape[1]) > 0)
                x[i] = torch.where(used, torch.where(x[i] > 0, x[i] / p.repetition_penalty,
                                                     x[i] * p.repetition_penalty), x[i])
            x[i] -= p.frequency_penalty * out + p.presence_penalty * (out > 0)
        return x

    def _mask_early_stop(self, x: torch.Tensor, chunks: list[SeqChunk]) -> None:
        for i, c in enumerate(chunks):
            if len(self.states[c.seq_id].tokens) - c.prompt_len < c.sampling.min_tokens:
                stop = list(c.sampling.stop_token_ids) + ([] if c.sampling.ignore_eos else list(self.eos))
                x[i, [t for t in stop if t < x.shape[1]]] = float("-inf")

    def _choose(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        tokens = x.argmax(dim=-1)  # [B]; greedy rows keep this
        rows = [i for i, c in enumerate(chunks) if not c.sampling.greedy]
        if rows:
            tokens[rows] = self._sample(x[rows], [chunks[i] for i in rows])
        return tokens

    def _sample(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        ps = [c.sampling for c in chunks]
        x = x / torch.tensor([p.temperature for p in ps])[:, None]
        sorted_x, index = torch.sort(x, dim=-1, descending=True)  # [B, V]
        probs = torch.softmax(sorted_x, dim=-1)
        rank = torch.arange(x.shape[1])[None, :]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else x.shape[1] for p in ps])[:, None]
        drop = rank >= top_k
        drop |= (probs.cumsum(-1) - probs) > torch.tensor([p.top_p for p in ps])[:, None]
        drop |= probs < torch.tensor([p.min_p for p in ps])[:, None] * probs[:, :1]
        drop[:, 0] = False  # the most likely token always survives
        probs = probs.masked_fill(drop, 0.0)
        cdf = probs.cumsum(-1)  # [B, V]
        u = torch.cat([torch.rand(1, generator=self.states[c.seq_id].generator) for c in chunks])  # [B]
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=x.shape[1] - 1)
        return index.gather(1, pick).squeeze(1)

    def _output(self, c: SeqChunk, token: int, raw: torch.Tensor | None) -> SampleOutput:
        n = c.sampling.logprobs
        if n is None or raw is None:
            return SampleOutput(c.seq_id, token)
        top = torch.topk(raw, n) if n else None
        alts = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
        return SampleOutput(c.seq_id, token, float(raw[token]), alts)
