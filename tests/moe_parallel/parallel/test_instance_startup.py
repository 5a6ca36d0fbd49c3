"""Starting a multi-process instance: the KV pool is sized by a dummy step that goes through the
expert ranks, so they must serve before it runs; one rank's methods never interleave on the
data plane (a shutdown waits for the step in flight); the warm-up is not counted as traffic."""

from __future__ import annotations

import threading
import time

import pytest

from bench.greedy import greedy
from moe_parallel.parallel.dispatch import ExpertServer, Op
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import AttentionWorker, InstanceSpec
from moe_parallel.step.cache_size import CacheSpec
from tests.moe_parallel.cases import PROMPTS, STEPS, check_parity


def test_disaggregated_instance_runs_its_dummy_step_through_the_experts_and_serves(tiny_ckpt):
    """The dummy prefill (what measures a GPU's peak) runs at start-up on the CPU too; before the
    fix it ran while the expert ranks were still waiting to be told to serve (a deadlock on
    NCCL, `PeerLost` on gloo)."""
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", 2, 2, cache=CacheSpec(memory_gib=0.01,
                                                                               max_num_batched_tokens=64),
                        comm_timeout_s=20)
    with LocalInstance(spec) as inst:
        assert inst.kv_blocks == int(0.01 * 1024**3) // (512 * 16)
        result = greedy(inst.step, PROMPTS, STEPS, ranks=2)
    check_parity(tiny_ckpt, result)


class _SlowRunner:
    def __init__(self, log: list):
        self.log = log

    def execute(self, batch):
        self.log.append("step starts")
        time.sleep(0.3)
        self.log.append("step ends")
        return []


class _Remote:
    def __init__(self, log: list):
        self.log = log

    def shutdown(self):
        self.log.append("shutdown header")

    def heartbeat(self):
        self.log.append("heartbeat header")


def test_shutdown_and_heartbeat_wait_for_the_step_in_flight():
    """Ray runs two methods of a rank at once (health probes during a step): a SHUTDOWN or
    HEARTBEAT header sent in the middle of a step would interleave with its collectives."""
    log: list[str] = []
    worker = object.__new__(AttentionWorker)
    worker.plane_lock, worker.runner, worker.remote = threading.Lock(), _SlowRunner(log), _Remote(log)
    step = threading.Thread(target=worker.execute, args=(None,))
    step.start()
    time.sleep(0.05)
    worker.heartbeat()
    worker.shutdown()
    step.join()
    assert log == ["step starts", "step ends", "heartbeat header", "shutdown header"]


class _FakePlane:
    """Headers handed to an `ExpertServer` one by one (a `DataPlane` seen from an expert rank)."""

    def __init__(self, topo, headers):
        import torch

        self.topo, self.device, self.dtype, self.hidden = topo, torch.device("cpu"), torch.float32, 4
        self.headers_left = list(headers)

    def receive(self):
        import torch

        op, layer, counts, *mb = self.headers_left.pop(0)
        rows = torch.zeros(sum(counts), self.hidden) if op == Op.LAYER else None
        return op, layer, mb[0] if mb else 0, [counts] * self.topo.attention_ranks, rows

    def reply(self, y, sizes):
        assert y.shape[0] == sum(sizes)


def test_warm_up_steps_are_not_counted_by_the_expert_ranks():
    from moe_parallel.parallel.dispatch import Topology

    topo = Topology(1, 1, 2)

    class Echo:
        first_expert = 0

        def __call__(self, x, ids):
            return x

    layer = [(Op.LAYER, 0, [3, 1]), (Op.LAYER, 1, [0, 2])]
    plane = _FakePlane(topo, [*layer, (Op.WARMUP_DONE, 0, [0, 0]), *layer, (Op.STEP_DONE, 0, [0, 0]),
                              (Op.SHUTDOWN, 0, [0, 0])])
    server = ExpertServer(plane, [Echo(), Echo()])
    server.serve()
    assert server.tokens_per_expert.tolist() == [[3, 1], [0, 2]] and server.steps == 1


class _Echo:
    first_expert = 0

    def __call__(self, x, ids):
        return x


def _serve(headers: list[tuple]):
    from moe_parallel.parallel.dispatch import Topology

    server = ExpertServer(_FakePlane(Topology(1, 1, 2), [*headers, (Op.SHUTDOWN, 0, [0, 0])]), [_Echo(), _Echo()])
    server.serve()
    return server


def _layer(layer: int, mb: int = 0) -> tuple:
    return (Op.LAYER, layer, [1, 1], mb)


def test_the_expert_servers_state_machine_takes_steps_micro_batches_and_idle_heartbeats():
    beat = (Op.HEARTBEAT, 0, [0, 0])
    done = (Op.STEP_DONE, 0, [0, 0])
    server = _serve([beat, _layer(0), _layer(1), done, beat, beat,
                     _layer(0, 0), _layer(0, 1), _layer(1, 0), _layer(1, 1), done])
    assert server.steps == 2 and server.heartbeats == 3
    assert server.tokens_per_expert.tolist() == [[3, 3], [3, 3]]


@pytest.mark.parametrize(("headers", "message"), [
    ([_layer(1)], "attention ranks sent LAYER layer 1"),  # a step must start at layer 0
    ([_layer(0), _layer(0)], "sent LAYER layer 0 micro-batch 0"),  # the same layer twice
    ([_layer(0), _layer(2)], "sent LAYER layer 2"),  # a layer skipped
    ([_layer(0, 0), _layer(0, 2)], "micro-batch 2"),  # a micro-batch skipped
    ([_layer(0), _layer(1), _layer(2)], "layer 2"),  # past the last layer
    ([_layer(0), (Op.HEARTBEAT, 0, [0, 0])], "heartbeat in the middle of a step"),
    ([_layer(0), (Op.STEP_DONE, 0, [0, 0])], "step ended after layer 0 of 2"),
    ([(Op.WARMUP_DONE, 0, [0, 0])], "step ended after layer -1"),
])
def test_the_expert_server_refuses_headers_out_of_order(headers, message):
    from moe_parallel.parallel.dispatch import ProtocolError

    with pytest.raises(ProtocolError, match=message):
        _serve(headers)


def test_attention_ranks_that_disagree_or_send_an_unknown_op_are_a_protocol_error():
    from moe_parallel.parallel.dispatch import DataPlane, ProtocolError

    assert DataPlane.agree([(int(Op.LAYER), 3, 1)] * 2) == (Op.LAYER, 3, 1)
    with pytest.raises(ProtocolError, match="disagree"):
        DataPlane.agree([(int(Op.LAYER), 3, 0), (int(Op.LAYER), 4, 0)])
    with pytest.raises(ProtocolError, match="unknown op 99"):
        DataPlane.agree([(99, 0, 0)])


@pytest.mark.parametrize("layout", ["disaggregated", "colocated"])
def test_ranks_start_without_building_any_deepspeed_op(tiny_ckpt, tmp_path, monkeypatch, layout):
    """DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce op into the torch
    extensions directory on the first start of a fresh install (a compiler at run time, tens
    of seconds); the ranks start with nothing built there, and serve."""
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))  # inherited by every rank
    spec = InstanceSpec(str(tiny_ckpt), layout, attention_ranks=1 if layout == "disaggregated" else 2,
                        expert_ranks=2 if layout == "disaggregated" else 0, comm_timeout_s=30)
    with LocalInstance(spec) as inst:
        assert greedy(inst.step, [[1, 2, 3]], 2, ranks=spec.attention_ranks).tokens
    assert not extensions.exists() or not any(extensions.rglob("*")), sorted(extensions.rglob("*"))
