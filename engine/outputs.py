"""What the engine streams back for a request: one `RequestOutput` per new piece of a completion."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely alternatives, (token id, logprob)
    rank: int | None = None  # the token's rank in the distribution (1: the most likely), where known


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    index: int  # which of the request's n completions this piece belongs to
    token_ids: tuple[int, ...]  # new token ids
    text: str  # new text (may be empty while a character or a possible stop string is incomplete)
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None  # "stop", "length", "abort" on the last piece, else None
    prompt_tokens: int
    completion_tokens: int  # so far, for this completion
    # on a completion's first piece, when asked: one entry per prompt token (None for the first)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    cached_tokens: int = 0  # on a completion's first piece: prompt tokens found in the prefix cache
    # for a traced request (`generate(..., trace=True)`): when this piece passed each hop, as
    # `time.monotonic()` seconds (one clock for every process of a host); see `engine.trace`
    trace: dict[str, float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineDeadError(RuntimeError):
    """The model instance failed; in-flight requests end with this, new ones are refused."""


class SequenceError(RuntimeError):
    """Handling one request failed (a server bug, not the client's input): that request ends
    with this error; the engine and every other request go on."""
