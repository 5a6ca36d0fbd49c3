"""A sequence: one of a request's `n` completions, as the scheduler tracks it.

`num_computed` counts the tokens whose K/V are in the cache; the tokens from there to the
end (`all_ids`) are what the next chunk must run. A preempted sequence drops its blocks and
goes back to `num_computed = 0`; its generated tokens stay, so recomputing it replays the same
context and its output is unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moe_parallel.contract import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int  # resolved: never past the model's context
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    rank: int | None = None  # attention rank holding its KV cache and sampler state
    status: Status = Status.WAITING
    finish_reason: str | None = None
    preemptions: int = 0
    lora: tuple[str, str] | None = None  # (adapter name, directory), or None for the base model
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob per prompt token from index 1 on
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hashes of its full blocks, in order
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache at its first admission

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def max_len(self) -> int:
        return len(self.prompt_ids) + self.max_tokens
