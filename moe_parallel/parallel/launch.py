"""A model instance as local OS processes, driven through pipes (tests, benchmarks, laptops).

`LocalInstance(spec)` starts one process per rank (forked from a server that has imported
torch and DeepSpeed once: `rank_start.py`). Attention ranks answer requests on their
pipe (`execute`, `step`, `heartbeat`, `shutdown`); expert ranks serve the data plane until shut
down. Every reply is awaited with a deadline and a liveness check, so a rank that dies
surfaces as `WorkerError` naming it rather than as a hang. Calls go to every attention rank
under one lock, so a background thread can send heartbeats while the instance is idle
(expert ranks time out after `comm_timeout_s` without a header). The Ray actors of the
serving engine wrap the same workers.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from moe_parallel.contract import StepBatch
from moe_parallel.parallel import rank_start
from moe_parallel.parallel.dispatch import heartbeat_period
from moe_parallel.parallel.workers import (
    AttentionWorker,
    InstanceSpec,
    build_expert_server,
    close_comm,
    exchange_kind,
    init_comm,
)


class WorkerError(RuntimeError):
    """A rank of the instance failed or died."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world: int) -> None:
    """This host's rank among the instance's processes (all of them here): where several GPUs
    are visible, `devices.resolve_device` picks GPU `LOCAL_RANK`, so ranks do not share one."""
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world)


def rank_threads(world: int, cores: int | None = None) -> int:
    """Threads per rank when an instance's ranks share one host's cores: an equal share, at least
    one: a rank given more spins its OpenMP workers while the others compute (docs/architecture.md,
    "threads per rank", has the measurement)."""
    return max(1, (cores or os.cpu_count() or 1) // world)


def _rank_main(spec: InstanceSpec, rank: int, addr: str, port: int, threads: int, conn) -> None:
    code = 1
    local_rank_env(rank, spec.world)
    import torch

    torch.set_num_threads(threads)
    try:
        _serve_rank(spec, rank, addr, port, conn)
        code = 0
    except Exception as exc:  # the parent turns this into WorkerError; the rank is done either way
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        close_comm()
        conn.close()
        # Skip interpreter teardown: communication threads torn down by static destructors while
        # peers exit at the same time can abort the process after its work is done.
        os._exit(code)


def _serve_rank(spec: InstanceSpec, rank: int, addr: str, port: int, conn) -> None:
    device = init_comm(spec, rank, addr, port)
    if not spec.is_attention(rank):
        server = build_expert_server(spec, rank, device)
        conn.send(("ready", {"tensors_read": server.tensors_read, "device": str(device), "exchange": exchange_kind()}))
        # serve (and so start timing the headers) once every rank is up: an attention rank may
        # still be loading, for longer than comm_timeout_s
        if conn.recv() != "serve":
            return
        server.serve()
        conn.send(("done", None))
        return
    worker = AttentionWorker(spec, rank, device)
    conn.send(("ready", worker.info()))
    while True:
        method, arg = conn.recv()
        conn.send(("ok", getattr(worker, method)(*arg)))
        if method == "shutdown":
            return


class LocalInstance:
    def __init__(self, spec: InstanceSpec, start_timeout_s: float = 120.0, addr: str = "127.0.0.1",
                 threads: list[int] | None = None):
        """`threads`: torch threads per rank (default `rank_threads`: the host's cores shared equally)."""
        self.spec, self.timeout_s = spec, spec.comm_timeout_s + 30.0
        self._lock = threading.Lock()
        for attempt in range(3):
            try:
                blocks = self._start(spec, start_timeout_s, addr, threads)
                break
            except WorkerError as exc:
                # the port free_port found was taken before rank 0 listened on it: another one
                if "EADDRINUSE" not in str(exc) or attempt == 2:
                    raise
        self.tensors_read = [i["tensors_read"] for i in self.info]
        # each rank sized its own pool (GPUs differ in free memory): schedule to the smallest
        self.kv_blocks = min(blocks)
        self._closed = threading.Event()
        self._beats = threading.Thread(target=self._heartbeats, name="instance-heartbeat", daemon=True)
        self._beats.start()

    def _start(self, spec: InstanceSpec, start_timeout_s: float, addr: str, threads: list[int] | None) -> list[int]:
        """Spawn the ranks and bring them up; returns each attention rank's KV blocks."""
        ctx = rank_start.context()
        port = free_port(addr)
        self.conns, self.procs = [], []
        for rank in range(spec.world):
            parent, child = ctx.Pipe()
            share = threads[rank] if threads else rank_threads(spec.world)
            proc = rank_start.process(ctx, f"{__name__}._rank_main", (spec, rank, addr, port, share), (child,),
                                      daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self._last_call = time.monotonic()
        try:
            self.info = [self._recv(r, start_timeout_s) for r in range(spec.world)]
            for r in range(spec.attention_ranks, spec.world):
                self.conns[r].send("serve")
            # the KV pool is sized once the expert ranks serve: sizing runs a dummy step through them
            return self.call("allocate_cache", [()] * spec.attention_ranks, start_timeout_s)
        except BaseException:
            self.kill()
            raise

    @property
    def attention(self) -> range:
        return range(self.spec.attention_ranks)

    def step(self, batches: list[StepBatch]) -> list[Any]:
        return self.call("step", [(b,) for b in batches])

    def call(self, method: str, args: list[tuple], timeout_s: float | None = None) -> list[Any]:
        with self._lock:
            try:
                for r in self.attention:
                    try:
                        self.conns[r].send((method, args[r]))
                    except OSError:
                        raise WorkerError(f"rank {r} closed its pipe (exit code {self.procs[r].exitcode})") from None
                return [self._recv(r, timeout_s or self.timeout_s) for r in self.attention]
            finally:
                self._last_call = time.monotonic()

    def _heartbeats(self) -> None:
        period = heartbeat_period(self.spec.comm_timeout_s)
        while not self._closed.wait(period / 4):
            if time.monotonic() - self._last_call < period:
                continue
            try:
                self.call("heartbeat", [()] * self.spec.attention_ranks)
            except (WorkerError, OSError):  # the next call reports the failure
                return

    def _recv(self, rank: int, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        conn, proc = self.conns[rank], self.procs[rank]
        while not conn.poll(0.05):
            if not proc.is_alive() and not conn.poll(0):
                raise WorkerError(f"rank {rank} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise WorkerError(f"rank {rank} did not answer within {timeout_s:.0f}s")
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            raise WorkerError(f"rank {rank} closed its pipe (exit code {proc.exitcode})") from None
        if kind == "error":
            raise WorkerError(f"rank {rank}: {value}")
        return value

    def close(self) -> None:
        """Shut the instance down cleanly; kill what does not stop in time."""
        self._closed.set()
        try:
            if all(p.is_alive() for p in self.procs):
                self.call("shutdown", [()] * self.spec.attention_ranks)
        except WorkerError:
            pass
        for p in self.procs:
            p.join(timeout=10)
        self.kill()

    def kill(self) -> None:
        if hasattr(self, "_closed"):
            self._closed.set()
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)

    def __enter__(self) -> LocalInstance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
