"""A request that outlives the replica running it: resumed elsewhere from its tokens so far.

The ingress sees every output it hands to the client, and a sequence's random draws are a
function of (its seed, the position), not of any generator state. So when the engine replica
running a request is lost (its model instance failed, its actor died, or it was stopped while
draining), the ingress submits the request again, to any healthy replica (another one, or the
replacement once it is up), with each unfinished completion's tokens so far
(`AsyncEngine.add_request(resume=...)`): that replica runs prompt and tokens as one prefill
(cheap where its prefix cache has them) and goes on from there as the lost one would have:
the same draws (a seeded request), penalties counted over the same tokens, the grammar
advanced over them, the stop strings and the detokenizer's held-back bytes where they were,
the same LoRA adapter, `max_tokens` counting what was already generated.

The client sees one stream: the outputs before and after line up with nothing repeated or
missing, and while the request waits for a replica an SSE comment (`: resuming`) goes out
every `stream_keepalive_s`. A request not running again within `resume_timeout_s` of the loss
ends as before, with the loss's error; so does one lost more than `MAX_LOSSES` times (a request
that itself brings instances down must not take every replica down in turn). A full queue
(Serve's back-pressure) during a resubmission is tried again, as a lost replica's requests all
come at once. Unseeded sampled requests resume too; their draws after
the loss are new ones, as after any restart.

    ResumableStream(call)            call(attempt, resume) -> an engine stream (chunks, cancel())
      chunks  -> tokens seen per completion, completions finished
      a loss  -> [WAITING], then call(k, {index: tokens so far}) until one answers or time is up
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from engine.outputs import RequestOutput

log = logging.getLogger(__name__)

# the failures that mean the replica (or its model instance) is gone, not that the request is bad
LOST = ("EngineDeadError", "ActorDiedError", "RayActorError", "ActorUnavailableError", "DeploymentUnavailableError")
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 1.0  # backoff between resubmissions while no replica takes it
# runs of one request that may be lost after a replica took them: a request that itself brings
# its instance down would otherwise take every replica down in turn
MAX_LOSSES = 3


class Waiting:
    """An item of an engine stream that is no output: the request is waiting to resume."""

    trace = None
    index = -1


WAITING = Waiting()


def _names(exc: BaseException) -> set[str]:
    cause = getattr(exc, "cause", None)
    return {t.__name__ for e in (exc, cause) if e is not None for t in type(e).__mro__}


def is_loss(exc: BaseException) -> bool:
    return bool(_names(exc) & set(LOST))


def _busy(exc: BaseException) -> bool:
    """Serve's back-pressure: every replica's queue is full (a lost replica's requests all came
    at once); a resubmission tries again, where a new request gets its 503."""
    return "BackPressureError" in _names(exc)


class ResumableStream:
    """One prompt's engine stream (chunks of `RequestOutput`), resumed on another replica when
    the one running it is lost. `call(attempt, resume)` starts the request (attempt 0, resume
    None) or resumes it (resume: unfinished completion index -> its tokens so far);
    `on_resumed(seconds)` is told how long each resumption took."""

    def __init__(self, call: Callable, n: int, timeout_s: float, wait_s: float,
                 on_resumed: Callable[[float], None] | None = None, name: str = ""):
        self.call, self.timeout_s, self.wait_s, self.on_resumed, self.name = call, timeout_s, wait_s, on_resumed, name
        self.tokens: dict[int, list[int]] = {i: [] for i in range(n)}
        self.finished: set[int] = set()
        self.current = call(0, None)
        self.attempts = 0
        self.losses = 0
        self.recovery: asyncio.Task | None = None
        self.lost_at = 0.0

    def __aiter__(self):
        return self

    async def __anext__(self) -> list:
        while True:
            if self.recovery is not None:
                done, _ = await asyncio.wait({self.recovery}, timeout=self.wait_s)
                if not done:
                    return [WAITING]
                recovery, self.recovery = self.recovery, None
                self.current, chunk = recovery.result()  # out of time: the loss's own error
                took = time.monotonic() - self.lost_at
                log.warning("request %s resumed after %.2fs (attempt %d)", self.name, took, self.attempts)
                if self.on_resumed is not None:
                    self.on_resumed(took)
                return self._seen(chunk)
            try:
                return self._seen(await self.current.__anext__())
            except StopAsyncIteration:
                raise
            except Exception as exc:
                if not is_loss(exc):
                    raise
                if len(self.finished) == len(self.tokens):  # lost after its last output: nothing is missing
                    _cancel(self.current)
                    raise StopAsyncIteration from None
                self.losses += 1
                if not self.timeout_s or self.losses > MAX_LOSSES:
                    raise
                log.warning("request %s lost its replica (%s: %s); resuming", self.name, type(exc).__name__, exc)
                _cancel(self.current)
                self.lost_at = time.monotonic()
                self.recovery = asyncio.ensure_future(self._recover(exc))
                return [WAITING]  # the client hears at once that it waits

    def _seen(self, chunk: list) -> list:
        for out in chunk:
            if isinstance(out, RequestOutput):
                self.tokens[out.index].extend(out.token_ids)
                if out.finished:
                    self.finished.add(out.index)
        return chunk

    async def _recover(self, loss: BaseException):
        """Resubmit until a replica answers with the request's next outputs, or time is up."""
        deadline, delay = self.lost_at + self.timeout_s, RETRY_FIRST_S
        while True:
            self.attempts += 1
            resume = {i: list(t) for i, t in self.tokens.items() if i not in self.finished}
            stream = self.call(self.attempts, resume)
            try:
                return stream, await asyncio.wait_for(stream.__anext__(), max(0.01, deadline - time.monotonic()))
            except (StopAsyncIteration, TimeoutError):  # no output in time, or an end without any
                _cancel(stream)
                raise loss from None
            except asyncio.CancelledError:
                _cancel(stream)
                raise
            except Exception as exc:
                _cancel(stream)
                if not (is_loss(exc) or _busy(exc)):
                    raise
                if is_loss(exc):
                    loss = exc  # the replica it went to is gone too (or not yet replaced): again
            left = deadline - time.monotonic()
            if left <= 0:
                raise loss
            await asyncio.sleep(min(delay, left))  # the last try at the deadline itself
            delay = min(RETRY_MAX_S, 2 * delay)

    def cancel(self) -> None:
        """The client left: stop resuming, and stop the request where it runs (a resubmission
        that a replica took already, but not yet handed on, too)."""
        recovery, self.recovery = self.recovery, None
        if recovery is not None:
            if recovery.done() and not recovery.cancelled() and recovery.exception() is None:
                _cancel(recovery.result()[0])
            recovery.cancel()
        _cancel(self.current)


def _cancel(stream) -> None:
    if hasattr(stream, "cancel"):
        stream.cancel()
