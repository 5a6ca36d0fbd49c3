"""A model instance as local OS processes, driven through pipes (tests, benchmarks, laptops).

`LocalInstance(spec)` starts one process per rank. Attention ranks answer requests on their
pipe (`step`, `shutdown`); expert ranks serve the data plane until shut down. Every reply
is awaited with a deadline and a liveness check, so a rank that dies surfaces as
`WorkerError` naming it rather than as a hang. The Ray actors of the serving engine wrap the
same workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from typing import Any

from moe_parallel.batch import StepBatch
from moe_parallel.workers import AttentionWorker, InstanceSpec, build_expert_server, close_comm, init_comm


class WorkerError(RuntimeError):
    """A rank of the instance failed or died."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rank_main(spec: InstanceSpec, rank: int, addr: str, port: int, conn) -> None:
    code = 1
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
    init_comm(spec, rank, addr, port)
    if not spec.is_attention(rank):
        server = build_expert_server(spec, rank)
        conn.send(("ready", server.tensors_read))
        server.serve()
        conn.send(("done", None))
        return
    worker = AttentionWorker(spec, rank)
    conn.send(("ready", worker.tensors_read))
    while True:
        method, arg = conn.recv()
        conn.send(("ok", getattr(worker, method)(*arg)))
        if method == "shutdown":
            return


class LocalInstance:
    def __init__(self, spec: InstanceSpec, start_timeout_s: float = 120.0, addr: str = "127.0.0.1"):
        self.spec, self.timeout_s = spec, spec.comm_timeout_s + 30.0
        ctx = mp.get_context("spawn")
        port = free_port(addr)
        self.conns, self.procs = [], []
        for rank in range(spec.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(spec, rank, addr, port, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            self.tensors_read = [self._recv(r, start_timeout_s) for r in range(spec.world)]
        except BaseException:
            self.kill()
            raise

    @property
    def attention(self) -> range:
        return range(self.spec.attention_ranks)

    def step(self, batches: list[StepBatch]) -> list[Any]:
        return self.call("step", [(b,) for b in batches])

    def call(self, method: str, args: list[tuple]) -> list[Any]:
        for r in self.attention:
            self.conns[r].send((method, args[r]))
        return [self._recv(r, self.timeout_s) for r in self.attention]

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
        except EOFError:
            raise WorkerError(f"rank {rank} closed its pipe (exit code {proc.exitcode})") from None
        if kind == "error":
            raise WorkerError(f"rank {rank}: {value}")
        return value

    def close(self) -> None:
        """Shut the instance down cleanly; kill what does not stop in time."""
        try:
            if all(p.is_alive() for p in self.procs):
                self.call("shutdown", [()] * self.spec.attention_ranks)
        except WorkerError:
            pass
        for p in self.procs:
            p.join(timeout=10)
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)

    def __enter__(self) -> LocalInstance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
