"""One message per engine step to each ingress on the host, instead of one per request.

Serve streams each request's outputs from its engine replica to the ingress as stream items:
one message per request and step, each costing the replica, the ingress and their gRPC event
loops a message's work (`bench.hops`). When the ingress and the engine replica run on one host,
the request still goes through Serve (routing, back-pressure, autoscaling's count of ongoing
requests, cancellation), but its outputs travel on a shared-memory channel (`shm.Channel`) that
the replica keeps for that ingress process: everything every request of that ingress got from
one step goes as one pickled message.

    ingress                                  engine replica
    OutputHub.call(request) --Serve call-->  generate(..., sink=(hub key, host))
      <-- first stream item: the channel's name  (Outlet created for that hub key)
      reader thread <--- one message per step: [RequestOutput | RequestFailure, ...]
      the request's stream ends when its last completion finished (or failed)

The Serve stream carries the channel's name, then stays open until the request is done; an
error raised before the request was accepted (back-pressure, a bad request) still comes through
it. A replica on another host, or one that cannot create the segment, streams its outputs
through Serve as before. The engine replica dying shows on the channel as `PeerLost` (its pid is
gone), which fails that channel's requests with `EngineDeadError`; a stopped or dead ingress
makes the replica drop its outlet (and the Serve calls of that ingress are cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from engine.outputs import EngineDeadError, RequestOutput
from moe_parallel.parallel import shm

log = logging.getLogger(__name__)
ENV = "MOE_SERVE_OUTPUTS_CHANNEL"  # "0" in the engine replicas' environment: outputs through Serve
CHANNEL_NAMES = {"label": "outputs channel", "sides": ("the engine replica", "the ingress")}
RING_BYTES = 1 << 20  # each way; a step's outputs are KBs, so a stalled reader has ~100 steps of slack
END_GRACE_S = 10.0  # after the Serve stream ended, how long the last outputs may take on the channel


@dataclass(frozen=True)
class RequestFailure:
    """A request's error, in order with its outputs on the channel."""

    request_id: str
    error: BaseException


# -- engine replica side ------------------------------------------------------------------------


class Outlet:
    """The engine replica's end of one ingress's channel: outputs gathered during a step, sent
    as one message once the event loop has run every request's stream (`add` schedules it)."""

    def __init__(self, key: str):
        self.name = f"{shm.PREFIX}out_{uuid.uuid4().hex}"
        self.channel = shm.Channel.create(self.name, RING_BYTES, **CHANNEL_NAMES)
        self.key, self.pending, self.lost = key, [], False
        self.messages = 0
        self._scheduled = False

    def add(self, items: list) -> None:
        if self.lost:
            return
        self.pending.extend(items)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self.pending or self.lost:
            return
        items, self.pending = self.pending, []
        now = time.monotonic()
        for item in items:
            if isinstance(item, RequestOutput) and item.trace is not None:
                item.trace["replica_yield"] = now
        try:
            self.channel.send(items)
            self.messages += 1
        except shm.PeerLost as exc:  # the ingress is gone; its Serve calls end too
            log.warning("the ingress of outlet %s is gone: %s", self.name, exc)
            self.lost = True

    def close(self) -> None:
        shm.Segment.unlink(self.name)  # gone already once the ingress mapped it; not if it never did
        self.channel.close()


class Outlets:
    """Every ingress's outlet of one engine replica, by the ingress's key."""

    def __init__(self):
        self.by_key: dict[str, Outlet] = {}
        self.host = socket.gethostname()

    def get(self, sink: tuple[str, str] | None) -> Outlet | None:
        """The outlet for `sink` (the ingress's key and host), or None: another host, or no
        segment to be had (the outputs then go through Serve)."""
        if sink is None or sink[1] != self.host or shm.available() or os.environ.get(ENV, "1") == "0":
            return None
        key = sink[0]
        outlet = self.by_key.get(key)
        if outlet is not None and outlet.lost:
            outlet.close()
            outlet = None
        if outlet is None:
            try:
                outlet = self.by_key[key] = Outlet(key)
            except OSError as exc:
                log.warning("outputs go through Serve: no outlet segment: %s", exc)
                return None
        return outlet

    def close(self) -> None:
        for outlet in self.by_key.values():
            outlet.close()
        self.by_key.clear()


# -- ingress side -------------------------------------------------------------------------------


class OutputHub:
    """The ingress process's end: one reader thread per engine replica's channel, handing each
    message to the event loop once; a request's outputs go to its own queue."""

    def __init__(self):
        self.key, self.host = uuid.uuid4().hex, socket.gethostname()
        self.queues: dict[str, asyncio.Queue] = {}
        self.channel_of: dict[str, str] = {}  # request id -> channel name
        self.readers: dict[str, threading.Thread] = {}
        self.dead: dict[str, str] = {}  # channel name -> why
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def sink(self) -> tuple[str, str]:
        return self.key, self.host

    def stream(self, request_id: str, indices, response) -> MuxedStream:
        """The request's outputs as chunks (lists), from `response` (the Serve streaming call);
        `indices`: its completions (all n, or those a resumed request still runs)."""
        self.loop = asyncio.get_running_loop()
        self.queues[request_id] = asyncio.Queue()
        return MuxedStream(self, request_id, indices, response)

    def attach(self, request_id: str, name: str) -> None:
        self.channel_of[request_id] = name
        if name in self.dead:
            self._fail(request_id, self.dead[name])
        elif name not in self.readers:
            channel = shm.Channel.open(name, **CHANNEL_NAMES)
            shm.Segment.unlink(name)  # both ends have it mapped: a crash leaves nothing in /dev/shm
            t = threading.Thread(target=self._read, args=(name, channel), name="outputs-channel", daemon=True)
            self.readers[name] = t
            t.start()

    def forget(self, request_id: str) -> None:
        self.queues.pop(request_id, None)
        self.channel_of.pop(request_id, None)

    def _read(self, name: str, channel: shm.Channel) -> None:
        loop = self.loop
        try:
            while True:
                try:
                    items = channel.recv()
                except Exception as exc:  # PeerLost: the engine replica is gone (or closed it)
                    loop.call_soon_threadsafe(self._lost, name, f"{type(exc).__name__}: {exc}")
                    return
                loop.call_soon_threadsafe(self._dispatch, items)
        except RuntimeError:  # the event loop is closed: this process is shutting down
            return
        finally:
            channel.close()

    def _dispatch(self, items: list) -> None:
        now = time.monotonic()
        for item in items:
            queue = self.queues.get(item.request_id)
            if queue is None:
                continue  # the request is gone (the client left)
            if isinstance(item, RequestOutput) and item.trace is not None:
                item.trace["ingress_recv"] = now
            queue.put_nowait(item)

    def _lost(self, name: str, why: str) -> None:
        self.dead[name] = why
        self.readers.pop(name, None)
        for request_id, channel in list(self.channel_of.items()):
            if channel == name:
                self._fail(request_id, why)

    def _fail(self, request_id: str, why: str) -> None:
        queue = self.queues.get(request_id)
        if queue is not None:
            queue.put_nowait(RequestFailure(request_id, EngineDeadError(f"the engine replica is gone: {why}")))


class MuxedStream:
    """One request's outputs from the hub, as the ingress's merge expects an engine stream: an
    async iterator of lists, with `cancel()`."""

    def __init__(self, hub: OutputHub, request_id: str, indices, response):
        self.hub, self.request_id, self.response = hub, request_id, response
        self.unfinished = set(indices)
        self.passthrough = False
        self.watcher: asyncio.Task | None = None
        self.started = False
        self.complete = asyncio.Event()
        self.failure: BaseException | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[RequestOutput]:
        if not self.started:
            self.started = True
            first = await self.response.__anext__()  # back-pressure and bad requests raise here
            if not isinstance(first, str):  # the replica streams through Serve
                self.passthrough = True
                self.hub.forget(self.request_id)
                return first
            self.hub.attach(self.request_id, first)
            self.watcher = asyncio.ensure_future(self._watch())
        if self.passthrough:
            return await self.response.__anext__()
        if self.failure is not None:
            self._done()
            raise self.failure
        if not self.unfinished:
            self._done(stop_watching=False)  # the Serve stream ends on its own
            raise StopAsyncIteration
        queue = self.hub.queues[self.request_id]
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        chunk = []
        for item in items:
            if isinstance(item, RequestFailure):  # after the outputs that came before it
                self.failure = item.error
                if not chunk:
                    self._done()
                    raise item.error
                break
            chunk.append(item)
            if item.finished:
                self.unfinished.discard(item.index)
        return chunk

    async def _watch(self) -> None:
        """The Serve stream ends after the replica sent the request's last outputs; an error on
        it (the replica's actor died) fails the request, as does silence after its end."""
        queue = self.hub.queues.get(self.request_id)
        try:
            async for _ in self.response:
                pass
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if queue is not None:
                queue.put_nowait(RequestFailure(self.request_id, exc))
            return
        try:
            await asyncio.wait_for(self.complete.wait(), END_GRACE_S)
        except TimeoutError:
            if queue is not None:
                queue.put_nowait(RequestFailure(self.request_id, EngineDeadError(
                    "the engine replica ended the request without sending its last outputs")))

    def _done(self, stop_watching: bool = True) -> None:
        self.complete.set()
        self.hub.forget(self.request_id)
        if stop_watching and self.watcher is not None:
            self.watcher.cancel()

    def cancel(self) -> None:
        """The client left: stop the Serve call (the replica aborts the request) and forget it."""
        self._done()
        self.response.cancel()
