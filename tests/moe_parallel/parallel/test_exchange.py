"""The two transports of the disaggregated data plane: shared memory (the default on one CPU
host) and gloo (forced), each against transformers; the shm plane's framing and its checks of
what arrives; and no segment left in /dev/shm by any of it."""

from __future__ import annotations

import pytest
import torch

from bench.greedy import greedy
from moe_parallel.parallel import shm
from moe_parallel.parallel.dispatch import Op, ProtocolError, ShmPlane, Topology
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from tests.moe_parallel.cases import PROMPTS, STEPS, check_parity, make

pytestmark = pytest.mark.skipif(bool(shm.available()), reason=f"shared-memory exchange unavailable: {shm.available()}")


@pytest.fixture(autouse=True)
def no_leftover_segments():
    before = set(shm.leftovers())
    yield
    assert set(shm.leftovers()) - before == set(), "a segment was left in /dev/shm"


# (variant, attention ranks, expert ranks, micro-batches run one after the other on one instance,
# transport). The other disaggregated parity tests (test_parity_distributed, test_pingpong,
# test_instance_startup, ...) run on `auto`, which is shm here: gloo runs their cases here.
CASES = [
    ("mixtral", 1, 2, (1, 2, 3), "gloo"),  # m=3: an empty micro-batch and expert ranks without rows
    ("mixed", 2, 2, (1, 2), "gloo"),  # two attention ranks, a sharded checkpoint, 6 experts top-3
    ("e4_k1", 1, 4, (1,), "gloo"),  # one expert per rank, top-1: most ranks get no rows most layers
    ("e4_k1", 1, 4, (1,), "shm"),
    ("e6_k3", 1, 3, (1,), "gloo"),
    ("e6_k3", 1, 3, (1,), "shm"),
]


@pytest.mark.parametrize(("variant", "a", "n", "ms", "exchange"), CASES,
                         ids=[f"{v}-{a}x{n}-{x}" for v, a, n, _, x in CASES])
def test_each_transport_matches_transformers(tmp_path_factory, variant, a, n, ms, exchange):
    path = make(tmp_path_factory.getbasetemp(), variant)
    with LocalInstance(InstanceSpec(str(path), "disaggregated", a, n, comm_timeout_s=30, exchange=exchange)) as inst:
        assert [i["exchange"] for i in inst.info] == [exchange] * (a + n)
        for m in ms:
            check_parity(path, greedy(inst.step, PROMPTS, STEPS, ranks=a, micro_batches=m))


def test_messages_larger_than_a_ring_go_through_in_pieces(tmp_path_factory):
    """4 KiB rings hold 16 rows of this model (hidden 64, float32): a 200-token prompt sends
    each expert rank about 200 routed rows and gets as many back, a dozen fills of a ring, with
    two micro-batches in flight at once (the attention rank drains while it sends)."""
    from moe_parallel.model.config import ModelConfig
    from tests.reference import reference_greedy

    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    assert ModelConfig.from_dir(path).hidden_size * 4 * 16 == 4096
    prompts = [[1, *range(3, 203)], [1, *range(250, 130, -1)]]
    spec = InstanceSpec(str(path), "disaggregated", 1, 2, comm_timeout_s=30, exchange="shm", shm_ring_kib=4)
    with LocalInstance(spec) as inst:
        for m in (1, 2):
            assert greedy(inst.step, prompts, 4, micro_batches=m).tokens == [
                reference_greedy(str(path), p, 4) for p in prompts]


def test_auto_picks_shm_on_one_cpu_host(tiny_ckpt):
    import os

    from moe_parallel.parallel.launch import rank_threads
    from moe_parallel.parallel.rank_start import RANK_ENV

    with LocalInstance(InstanceSpec(str(tiny_ckpt), "disaggregated", 1, 2)) as inst:
        assert [i["exchange"] for i in inst.info] == ["shm"] * 3
        # after its last layer the attention rank runs on every core the three ranks have
        threads = rank_threads(3)
        assert inst.info[0]["threads"] == threads
        assert inst.info[0]["burst_threads"] == max(threads, min(len(os.sched_getaffinity(0)), 3 * threads))
        for proc in inst.procs:  # libgomp read it as torch loaded in the fork server the ranks come from
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            assert {k: env.get(k.encode()) for k in RANK_ENV} == {k: v.encode() for k, v in RANK_ENV.items()}


def test_exchange_is_validated():
    with pytest.raises(ValueError, match="exchange 'tcp' is not one of auto, gloo, shm"):
        InstanceSpec("unused", exchange="tcp")


class _Pair:
    """Attention rank 0 and expert rank 1 of a 1x1 instance in this one process, on one segment."""

    def __init__(self, experts_per_rank: int = 2, hidden: int = 4, ring: int = 1 << 16, timeout_s: float = 0.3,
                 max_rows: int = 100):
        self.name = shm.PREFIX + "test_" + str(id(self))
        self.topo = Topology(1, 1, experts_per_rank)
        seg_a = shm.Segment.create(self.name, 1, 1, ring)
        seg_e = shm.Segment.open(self.name)
        shm.Segment.unlink(self.name)
        seg_a.join(0)
        seg_e.join(1)
        self.attention = ShmPlane(self.topo, hidden, torch.float32, seg_a, 0, timeout_s, max_rows)
        self.expert = ShmPlane(self.topo, hidden, torch.float32, seg_e, 1, timeout_s, max_rows)

    def raw_header(self, *words: int) -> None:
        """Write a header of the attention rank's width, words as given (the rest 0)."""
        p = self.attention
        p.fmt.pack_into(p.head_out, 0, *words, *[0] * (p.fmt.size // 8 - len(words)))
        p.out[0].send(p.head_out_ptr, p.fmt.size, "header")

    def close(self) -> None:
        self.attention.close()
        self.expert.close()


@pytest.fixture
def pair():
    p = _Pair()
    yield p
    p.close()


def test_a_layer_round_trip_frames_header_rows_and_outputs(pair):
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    y = torch.empty_like(x)
    handle = pair.attention.post(Op.LAYER, 5, 1, torch.tensor([[2, 1]]), x, y, [3])
    op, layer, mb, counts, rows = pair.expert.receive()
    assert (op, layer, mb, counts) == (Op.LAYER, 5, 1, [[2, 1]])
    assert torch.equal(rows, x)
    pair.expert.reply(rows * 2, [3])
    pair.attention.wait(handle)
    assert torch.equal(y, x * 2)
    pair.attention.control(Op.STEP_DONE)
    assert pair.expert.receive()[:4] == (Op.STEP_DONE, 0, 0, [[0, 0]])


def test_full_rings_both_ways_do_not_deadlock():
    """Two micro-batches of 150 rows (9.6 KB each way) through 4 KiB rings: the expert rank
    blocks replying to the first while the attention rank blocks sending the second, and only
    the attention rank's draining of its incoming ring while it sends gets both through."""
    import threading

    p = _Pair(hidden=16, ring=4096, timeout_s=10, max_rows=1000)
    try:
        xs = [torch.randn(150, 16) for _ in range(2)]
        ys = [torch.empty_like(x) for x in xs]

        def expert():
            for _ in range(2):
                _, _, _, counts, rows = p.expert.receive()
                p.expert.reply(rows + 1, [sum(counts[0])])

        t = threading.Thread(target=expert)
        t.start()
        handles = [p.attention.post(Op.LAYER, 0, i, torch.tensor([[150, 0]]), x, y, [150])
                   for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
        for h in handles:
            p.attention.wait(h)
        t.join(5)
        assert not t.is_alive()
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(y, x + 1)
    finally:
        p.close()


@pytest.mark.parametrize(("words", "message"), [
    ((0x1234, 0, 0, 0), "malformed header"),
    ((ShmPlane.MAGIC | int(Op.LAYER), 0, 0, 3, 1, 1), r"announced 3 rows as \[1, 1\]"),
    ((ShmPlane.MAGIC | int(Op.LAYER), 0, 0, 1, -1, 2), "announced 1 rows"),
    ((ShmPlane.MAGIC | int(Op.LAYER), 0, 0, 101, 100, 1), "at most 100 rows"),
    ((ShmPlane.MAGIC | 77, 0, 0, 0), "unknown op 77"),
    ((ShmPlane.MAGIC | int(Op.STEP_DONE), 0, 0, 2, 1, 1), "STEP_DONE header announced rows"),
])
def test_a_malformed_header_is_a_protocol_error_before_any_row_is_read(pair, words, message):
    pair.raw_header(*words)
    with pytest.raises(ProtocolError, match=message):
        pair.expert.receive()


def test_a_silent_peer_is_lost_after_the_timeout_and_a_closed_one_at_once(pair):
    with pytest.raises(shm.PeerLost, match="no progress for 0s"):
        pair.expert.receive()  # alive (this process) but sends nothing
    pair.attention.seg.close()  # the attention rank leaves
    with pytest.raises(shm.PeerLost, match="rank 0 left the instance"):
        pair.expert.receive()


def test_a_segment_needs_the_room_it_asks_for(monkeypatch):
    class Full:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(shm.os, "statvfs", lambda _: Full())
    with pytest.raises(OSError, match=r"needs .* MiB of /dev/shm, 0.0 MiB are free"):
        shm.Segment.create(shm.PREFIX + "test_full", 1, 2, 1 << 20)
    assert shm.PREFIX + "test_full" not in shm.leftovers()


@pytest.mark.parametrize("exchange", ["shm", "gloo"])
def test_bfloat16_disaggregated_stays_close_to_float32(tmp_path_factory, exchange):
    """The bfloat16 rows through either transport (on shm the native layer calls): prefill logits
    against transformers' float32 within the bounds of the `single` layout's bfloat16 test
    (tests/moe_parallel/model/test_parity_single.py has the reasoning), and whole decodes."""
    from tests.reference import reference_logits

    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    spec = InstanceSpec(str(path), "disaggregated", 1, 2, dtype="bfloat16", comm_timeout_s=30, exchange=exchange)
    with LocalInstance(spec) as inst:
        result = greedy(inst.step, PROMPTS, 4)
    per_position = []
    for prompt, logits in zip(PROMPTS, result.prompt_logits, strict=True):
        diff = (logits.float() - reference_logits(str(path), prompt)).abs()
        assert diff.mean() < 0.02
        per_position.append(diff.max(dim=-1).values)
    assert torch.cat(per_position).median() < 0.1
    assert all(len(t) == 4 for t in result.tokens)
