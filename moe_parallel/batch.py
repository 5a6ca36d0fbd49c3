"""What one engine step asks of an attention rank: which tokens of which sequences to run.

A `SeqChunk` is the next piece of one sequence: its new token ids, how many of its tokens
are already in the KV cache (`start`), and its block table. A prompt's prefill may be split
over several steps; a decode step is a chunk of one token.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_parallel.sampling_params import Guided, SamplingParams


@dataclass(frozen=True)
class SeqChunk:
    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    # When set, sample the token that follows this chunk (the last chunk of a prefill, or a
    # decode step). `prompt_len` and `seed` let the rank keep the sequence's sampler state.
    sampling: SamplingParams | None = None
    prompt_len: int = 0
    seed: int = 0
    lora: str | None = None  # the LoRA adapter this sequence runs with (its path comes in StepBatch.loras)
    # Prompt logprobs: score the chunk's prompt positions (N alternatives each); `next_token`
    # is the prompt token after the chunk (-1 when the chunk reaches the end of the prompt).
    prompt_logprobs: int | None = None
    next_token: int = -1
    guided: Guided | None = None  # on every chunk of a constrained sequence: the rank prepares its matcher early
    # The tokens before `start`, on a sequence's first chunk after admission when its prefix
    # came from the prefix cache (the rank rebuilds its sampler state from them)
    history: tuple[int, ...] | None = None

    @property
    def scored(self) -> int:
        """How many of the chunk's positions predict a prompt token (scored for prompt logprobs)."""
        if self.prompt_logprobs is None:
            return 0
        return max(0, min(self.end, self.prompt_len - 1) - self.start)

    def score_targets(self) -> list[int]:
        """The prompt tokens that the scored positions predict."""
        n = self.scored
        return list(self.token_ids[1:n + 1]) + ([self.next_token] if n == len(self.token_ids) else [])

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class StepBatch:
    chunks: tuple[SeqChunk, ...]
    all_logits: bool = False  # logits of every token (tests, echo) instead of each chunk's last
    finished: tuple[int, ...] = ()  # sequences whose per-sequence state the rank may drop
    micro_batches: int = 1  # ping-pong micro-batches (disaggregated); the same on every rank of a step
    loras: tuple[tuple[str, str], ...] = ()  # (name, path) of every adapter the chunks use
    drop_loras: tuple[str, ...] = ()  # adapters unloaded: free their slots

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
