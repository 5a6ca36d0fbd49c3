"""What the engine and an attention rank say to each other, and nothing else.

The engine sends a `StepBatch` per step: for each sequence a `SeqChunk`, the next piece of it
(its new token ids, how many of its tokens are already in the KV cache (`start`), its block
table). A prompt's prefill may be split over several steps; a decode step is a chunk of one
token. The rank answers with a `SampleOutput` per sampled sequence.

`SamplingParams` is what a request asks of sampling and stopping, validated once, at
submission. Field meanings follow vLLM's `SamplingParams` (and through it the OpenAI API):
`temperature` 0 means greedy; `top_k` 0 or -1 means off; `logprobs` N returns the sampled
token's log probability and the N most likely alternatives; `logit_bias` adds a bias to the
named tokens' logits before sampling (OpenAI's meaning). An invalid value raises
`InvalidRequest` naming the field, which the HTTP layer turns into a 400; checks that need the
vocabulary (`check_vocab`) run when the engine admits the request.
"""

from __future__ import annotations

from dataclasses import dataclass


class InvalidRequest(ValueError):
    """Something about a request that its sender must change; `param` names the field. Only
    these become a 400 over HTTP: any other exception is the server's fault (a 500)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Guided:
    """What constrained decoding holds the output to. `kind` is one of `json` (`spec`: a JSON
    schema as text; `{}`-like schemas allow any JSON value), `json_object` (any JSON object),
    `regex`, `choice` (`spec`: a JSON list of strings) or `lark` (a Lark grammar). The text is
    the cache key of the compiled grammar."""

    kind: str
    spec: str


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    # log-probabilities of the prompt's tokens (each given the tokens before it) and the N most
    # likely alternatives at each position; computed during the prefill. With it, max_tokens 0
    # is a scoring call: the prompt is run, nothing is generated.
    prompt_logprobs: int | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never to complete (vLLM's bad_words)
    guided: Guided | None = None  # constrained decoding: the output must match this

    def __post_init__(self):
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be between 0 and 100"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1, 0 (off) or a positive number"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be between 0 and 1"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be between -2 and 2"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be between -2 and 2"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 20.0, "must be in (0, 20]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1
             or (self.max_tokens == 0 and self.prompt_logprobs is not None),
             "must be at least 1 (0 only for a scoring call, with prompt logprobs)"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must not exceed max_tokens"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be between 0 and 20"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "must be between 0 and 20"),
            ("bad_words", all(w for w in self.bad_words), "must be non-empty"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**64, "must fit in 64 bits"),
            ("logit_bias", all(-100.0 <= b <= 100.0 for _, b in self.logit_bias), "values must be in [-100, 100]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidRequest(f"{name} {why} (got {getattr(self, name)!r})", param=name)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must exist: a negative or huge id would index outside
        the logits (or, negative, silently hit the wrong token)."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias]),
                          ("bad_words", [t for w in self.bad_words for t in w])):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})", param=name)

    @property
    def greedy(self) -> bool:
        # below this, dividing the logits overflows float32 (vLLM treats it the same way)
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


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


@dataclass(frozen=True)
class SampleOutput:
    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    error: str | None = None  # sampling this sequence failed (token_id is then meaningless)
    # prompt logprobs of this step's chunk: (token id, logprob, rank, alternatives) for the prompt
    # tokens from index `prompt_start` on; `sampled` is False when no token was sampled
    prompt_logprobs: tuple[tuple[int, float, int, tuple[tuple[int, float], ...]], ...] | None = None
    prompt_start: int = 0
    sampled: bool = True
