"""The outputs channel between an engine replica and an ingress on one host, without Serve: a
fake Serve response stands in for the streaming call."""

from __future__ import annotations

import asyncio

import pytest

from deployments.outputs_channel import Outlets, OutputHub, RequestFailure
from engine.outputs import EngineDeadError, RequestOutput
from moe_parallel.contract import InvalidRequest
from moe_parallel.parallel import shm


def out(rid: str, token: int, index: int = 0, finish: str | None = None) -> RequestOutput:
    return RequestOutput(rid, index, (token,), f"t{token}", None, finish, 3, token)


class FakeResponse:
    """A Serve streaming response: the items given, then the end (or an error), and cancel()."""

    def __init__(self, items: list, end: asyncio.Event | None = None, error: BaseException | None = None):
        self.items, self.end, self.error, self.cancelled = list(items), end, error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.end is not None:
            await self.end.wait()
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


async def started(hub: OutputHub, outlets: Outlets, n: int = 1):
    """Request "r" on this hub's outlet, its first output awaited in the background."""
    outlet = outlets.get(hub.sink)
    stream = hub.stream("r", range(n), FakeResponse([outlet.name], asyncio.Event()))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    return outlet, stream, first


@pytest.fixture
def pair():
    if shm.available():
        pytest.skip(shm.available())
    hub, outlets = OutputHub(), Outlets()
    yield hub, outlets
    outlets.close()


def test_one_message_per_step_carries_every_request_in_order(pair):
    """Two requests' outputs added during one loop turn go as one message; each request's stream
    gets its own outputs in order and ends when its completions finished."""
    hub, outlets = pair

    async def main():
        outlet = outlets.get(hub.sink)
        ends = [asyncio.Event(), asyncio.Event()]
        streams = [hub.stream(rid, [0], FakeResponse([outlet.name], ends[i])) for i, rid in enumerate("ab")]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.sleep(0)
        sent = []
        real_send = outlet.channel.send
        outlet.channel.send = lambda items: (sent.append(len(items)), real_send(items))
        for t in range(3):  # three steps
            outlet.add([out("a", t, finish="length" if t == 2 else None)])
            outlet.add([out("b", 10 + t, finish="length" if t == 2 else None)])
            await asyncio.sleep(0.05)
        got = {rid: [] for rid in "ab"}
        for rid, s, first in zip("ab", streams, firsts, strict=True):
            got[rid] += [o.token_ids[0] for o in await first]
            async for chunk in s:
                got[rid] += [o.token_ids[0] for o in chunk]
        for e in ends:
            e.set()
        return sent, got

    sent, got = asyncio.run(main())
    assert sent == [2, 2, 2]  # one message a step, both requests in it
    assert got == {"a": [0, 1, 2], "b": [10, 11, 12]}


def test_a_failure_on_the_channel_raises_in_order_after_the_outputs_before_it(pair):
    hub, outlets = pair

    async def main():
        outlet, s, first = await started(hub, outlets)
        outlet.add([out("r", 1), RequestFailure("r", InvalidRequest("bad thing", param="stop"))])
        chunk = await first
        with pytest.raises(InvalidRequest) as err:
            await anext(s)
        return chunk, err.value

    chunk, exc = asyncio.run(main())
    assert [o.token_ids for o in chunk] == [(1,)]
    assert exc.param == "stop" and "bad thing" in str(exc)


def test_the_replica_closing_its_end_fails_the_requests_as_a_dead_engine(pair):
    hub, outlets = pair

    async def main():
        outlet, _, first = await started(hub, outlets)
        await asyncio.sleep(0.05)
        outlet.close()  # as when the replica's process ends: the reader sees PeerLost
        return await asyncio.wait_for(first, 5)

    with pytest.raises(EngineDeadError):
        asyncio.run(main())


def test_an_error_on_the_serve_stream_fails_the_request(pair):
    hub, outlets = pair

    async def main():
        outlet = outlets.get(hub.sink)
        s = hub.stream("r", [0], FakeResponse([outlet.name], error=RuntimeError("ActorDiedError: gone")))
        return await asyncio.wait_for(anext(s), 5)

    with pytest.raises(RuntimeError, match="gone"):
        asyncio.run(main())


def test_a_replica_elsewhere_streams_through_serve_and_cancel_reaches_serve(pair):
    hub, outlets = pair
    assert outlets.get(("k", "another-host")) is None and outlets.get(None) is None

    async def main():
        resp = FakeResponse([[out("r", 1)], [out("r", 2, finish="stop")]])
        s = hub.stream("r", [0], resp)
        chunks = [c async for c in s]
        resp2 = FakeResponse([[out("q", 1)]], asyncio.Event())
        s2 = hub.stream("q", [0], resp2)
        await anext(s2)
        s2.cancel()
        return chunks, resp2.cancelled

    chunks, cancelled = asyncio.run(main())
    assert [o.token_ids for c in chunks for o in c] == [(1,), (2,)] and cancelled
    assert not hub.queues  # nothing left behind


def test_n_completions_end_the_stream_only_when_all_finished(pair):
    hub, outlets = pair

    async def main():
        outlet, s, first = await started(hub, outlets, n=2)
        outlet.add([out("r", 1, 0, "length"), out("r", 2, 1)])
        await asyncio.sleep(0.05)
        outlet.add([out("r", 3, 1, "length")])
        chunks = [await first]
        async for c in s:
            chunks.append(c)
        return [(o.index, o.token_ids[0]) for c in chunks for o in c]

    assert asyncio.run(main()) == [(0, 1), (1, 2), (1, 3)]
