"""The ingress's resumption of a request whose replica was lost (`deployments/resume.py`), on
fake engine streams: what it resubmits, what the client's stream gets, when it gives up."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.resume import WAITING, ResumableStream
from engine.outputs import EngineDeadError, RequestOutput, SequenceError


class ActorDiedError(Exception):
    """Named as Ray's: what a Serve call raises when the replica's actor died."""


def out(index: int, token: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", index, (token,), f"<{token}>", None, finish, 3, 0)


class FakeStream:
    """An engine stream: these chunks, then this error (or the end); remembers a cancel."""

    def __init__(self, chunks, error: BaseException | None = None, first_delay: float = 0.0):
        self.chunks, self.error, self.first_delay, self.cancelled = list(chunks), error, first_delay, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
            self.first_delay = 0.0
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class Calls:
    def __init__(self, *streams):
        self.streams, self.made = list(streams), []

    def __call__(self, attempt, resume):
        self.made.append((attempt, resume))
        return self.streams[min(attempt, len(self.streams) - 1)]


async def drain(stream) -> list:
    return [item for chunk in [c async for c in stream] for item in chunk]


def test_a_lost_replica_is_resumed_with_the_tokens_so_far_and_the_client_sees_one_stream():
    lost = EngineDeadError("the model instance failed: an expert rank died")
    first = FakeStream([[out(0, 1), out(1, 7)], [out(0, 2), out(1, 8, "length")]], lost)
    gone = FakeStream([], ActorDiedError("the replica is gone"))  # not replaced yet: again
    second = FakeStream([[out(0, 3)], [out(0, 4, "stop")]])
    calls, took = Calls(first, gone, second), []
    items = asyncio.run(drain(ResumableStream(calls, 2, timeout_s=5, wait_s=1, on_resumed=took.append)))
    assert [(o.index, o.token_ids) for o in items if o is not WAITING] == [
        (0, (1,)), (1, (7,)), (0, (2,)), (1, (8,)), (0, (3,)), (0, (4,))]
    assert items[4] is WAITING  # straight after the loss: the client hears it waits
    assert calls.made == [(0, None), (1, {0: [1, 2]}), (2, {0: [1, 2]})]  # completion 1 had finished
    assert first.cancelled and gone.cancelled and not second.cancelled
    assert len(took) == 1 and 0 < took[0] < 5


def test_errors_that_are_not_a_loss_are_not_resumed():
    calls = Calls(FakeStream([[out(0, 1)]], SequenceError("sampling failed: nan")))
    with pytest.raises(SequenceError):
        asyncio.run(drain(ResumableStream(calls, 1, timeout_s=5, wait_s=1)))
    assert calls.made == [(0, None)]


def test_resuming_off_fails_as_before():
    calls = Calls(FakeStream([[out(0, 1)]], EngineDeadError("gone")))
    with pytest.raises(EngineDeadError):
        asyncio.run(drain(ResumableStream(calls, 1, timeout_s=0, wait_s=1)))
    assert calls.made == [(0, None)]


def test_no_replica_in_time_ends_with_the_loss_and_waits_are_heard_meanwhile():
    lost = EngineDeadError("gone")
    calls = Calls(FakeStream([[out(0, 1)]], lost), FakeStream([], ActorDiedError("still gone")))
    got: list = []

    async def main():
        async for chunk in ResumableStream(calls, 1, timeout_s=1.0, wait_s=0.2):
            got.extend(chunk)

    start = time.monotonic()
    with pytest.raises(ActorDiedError, match="still gone"):
        asyncio.run(main())
    took = time.monotonic() - start
    assert 0.9 < took < 3.0
    assert got[0].token_ids == (1,) and sum(x is WAITING for x in got) >= 4  # one at once, then every 0.2 s
    assert len(calls.made) > 2  # resubmitted with backoff until the deadline


def test_a_replica_that_takes_too_long_to_answer_counts_as_none():
    calls = Calls(FakeStream([[out(0, 1)]], EngineDeadError("gone")), FakeStream([[out(0, 2)]], first_delay=5))
    with pytest.raises(EngineDeadError):
        asyncio.run(drain(ResumableStream(calls, 1, timeout_s=0.5, wait_s=0.1)))
    assert calls.streams[1].cancelled


def test_a_client_that_leaves_while_resuming_stops_the_resubmitted_request():
    slow = FakeStream([[out(0, 2)]], first_delay=5)
    calls = Calls(FakeStream([[out(0, 1)]], EngineDeadError("gone")), slow)

    async def main():
        s = ResumableStream(calls, 1, timeout_s=10, wait_s=0.05)
        assert (await anext(s))[0].token_ids == (1,)
        assert await anext(s) == [WAITING]
        await asyncio.sleep(0.1)  # the resubmission is out, waiting for its first output
        s.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert calls.made[-1] == (1, {0: [1]}) and slow.cancelled


class BackPressureError(Exception):
    """Named as Serve's: every replica's queue is full."""


def test_full_queues_while_resuming_are_tried_again_and_a_loss_after_the_last_output_is_no_error():
    calls = Calls(FakeStream([[out(0, 1)]], EngineDeadError("gone")),
                  FakeStream([], BackPressureError("queue full")),
                  FakeStream([[out(0, 2, "length")]], ActorDiedError("gone after its last output")))
    items = asyncio.run(drain(ResumableStream(calls, 1, timeout_s=5, wait_s=1)))
    assert [o.token_ids for o in items if o is not WAITING] == [(1,), (2,)]
    assert calls.made == [(0, None), (1, {0: [1]}), (2, {0: [1]})]


def test_a_request_lost_again_and_again_ends_with_the_loss():
    """Each run a replica takes dies (as if the request itself brought it down): after
    MAX_LOSSES resumptions the client gets the error instead of every replica going down."""
    from deployments.resume import MAX_LOSSES

    class Deadly(Calls):
        def __call__(self, attempt, resume):
            self.made.append((attempt, resume))
            return FakeStream([[out(0, 10 + attempt)]], EngineDeadError(f"run {attempt} died"))

    calls = Deadly()
    with pytest.raises(EngineDeadError, match=f"run {MAX_LOSSES} died"):
        asyncio.run(drain(ResumableStream(calls, 1, timeout_s=5, wait_s=1)))
    assert len(calls.made) == MAX_LOSSES + 1


def test_a_client_that_leaves_just_as_a_replica_took_the_resumption_stops_it_there():
    taken = FakeStream([[out(0, 2)], [out(0, 3, "length")]])
    calls = Calls(FakeStream([[out(0, 1)]], EngineDeadError("gone")), taken)

    async def main():
        s = ResumableStream(calls, 1, timeout_s=10, wait_s=5)
        await anext(s)
        assert await anext(s) == [WAITING]
        await asyncio.sleep(0.3)  # the resubmission has its first output; not handed on yet
        assert s.recovery.done()
        s.cancel()

    asyncio.run(main())
    assert taken.cancelled
