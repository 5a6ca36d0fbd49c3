"""A rank that dies turns into a clear error on its peers within a bounded time, not a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest

from bench.greedy import greedy
from moe_parallel.parallel import shm
from moe_parallel.parallel.launch import LocalInstance, WorkerError
from moe_parallel.parallel.workers import InstanceSpec

EXCHANGES = ["gloo", "shm"] if not shm.available() else ["gloo"]
# what the waiting rank says about a peer that is gone, per transport
LOST = {"gloo": "PeerLost: header exchange .* failed", "shm": "PeerLost: .*rank [12]"}


@pytest.fixture(autouse=True)
def no_leftover_segments():
    """Killed, stopped or cleanly shut down: no instance leaves its segment in /dev/shm."""
    before = set(shm.leftovers())
    yield
    assert set(shm.leftovers()) - before == set()


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_dead_expert_rank_makes_attention_rank_raise(tiny_ckpt, exchange):
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=1, expert_ranks=2, comm_timeout_s=10,
                        exchange=exchange)
    inst = LocalInstance(spec)
    try:
        assert len(greedy(inst.step, [[1, 2, 3]], 2).tokens[0]) == 2  # healthy first
        os.kill(inst.procs[2].pid, signal.SIGKILL)
        inst.procs[2].join(5)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="rank 0: " + LOST[exchange]) as err:
            greedy(inst.step, [[1, 2, 3]], 2)
        # gloo waits out the timeout; shm sees the dead pid within a liveness slice
        assert time.monotonic() - start < (spec.comm_timeout_s + 5 if exchange == "gloo" else 3)
        assert "died" not in str(err.value)  # the attention rank raised and reported, it did not just vanish
        inst.procs[1].join(spec.comm_timeout_s + 5)  # the surviving expert rank stops too
        assert not inst.procs[1].is_alive()
    finally:
        inst.kill()


def test_shutdown_stops_every_rank(tiny_ckpt):
    inst = LocalInstance(InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=2, expert_ranks=2))
    greedy(inst.step, [[1, 2], [1, 3, 4]], 1, ranks=2)
    start = time.monotonic()
    inst.close()
    assert [p.exitcode for p in inst.procs] == [0, 0, 0, 0]
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_idle_instance_outlives_the_timeout_through_heartbeats(tiny_ckpt, exchange):
    """Expert ranks wait for every header with `comm_timeout_s`; the driver's heartbeats keep an
    idle instance within it."""
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=1, expert_ranks=2, comm_timeout_s=2,
                        exchange=exchange)
    with LocalInstance(spec) as inst:
        first = greedy(inst.step, [[1, 2, 3]], 2).tokens
        time.sleep(2 * spec.comm_timeout_s)  # idle for twice the timeout
        assert all(p.is_alive() for p in inst.procs)
        assert greedy(inst.step, [[1, 2, 3]], 2).tokens == first


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_stuck_driver_side_fails_the_expert_ranks_within_the_timeout(tiny_ckpt, exchange):
    """A hung (not dead) attention rank: the expert ranks give up within comm_timeout_s instead
    of waiting for a header forever."""
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=1, expert_ranks=2, comm_timeout_s=3,
                        exchange=exchange)
    inst = LocalInstance(spec)
    try:
        greedy(inst.step, [[1, 2, 3]], 2)
        os.kill(inst.procs[0].pid, signal.SIGSTOP)
        start = time.monotonic()
        for p in inst.procs[1:]:
            p.join(spec.comm_timeout_s + 10)
        assert [p.is_alive() for p in inst.procs[1:]] == [False, False]
        assert time.monotonic() - start < spec.comm_timeout_s + 10
        assert [p.exitcode for p in inst.procs[1:]] == [1, 1]  # they raised, not a clean shutdown
        stuck = "header exchange" if exchange == "gloo" else "header exchange with rank 0: no progress for 3s"
        with pytest.raises(WorkerError, match="rank 1: PeerLost: " + stuck):
            inst._recv(1, 1)
    finally:
        os.kill(inst.procs[0].pid, signal.SIGCONT)
        inst.kill()


def test_a_port_taken_before_rank_0_listens_is_retried_with_another(tiny_ckpt, monkeypatch):
    """free_port's port can be taken between the check and rank 0's bind (other instances'
    connections come and go); the instance starts again on a fresh port instead of failing."""
    import socket

    from moe_parallel.parallel import launch

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda host="127.0.0.1": ports.pop() if ports else real(host))
    try:
        with LocalInstance(InstanceSpec(str(tiny_ckpt), "disaggregated", 1, 1, comm_timeout_s=10)) as inst:
            assert not ports  # the taken port was tried first
            assert len(greedy(inst.step, [[1, 2, 3]], 2).tokens[0]) == 2
    finally:
        taken.close()
