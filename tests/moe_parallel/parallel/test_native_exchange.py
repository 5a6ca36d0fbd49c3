"""The shared-memory exchange's native layer calls (`native.shm_dispatch` on the attention rank,
`native.shm_expert_layer` on an expert rank) against the Python ring path they stand in for:
the same rows in the same order, the same outputs to the bit, the experts' math against a
plain torch SwiGLU, the thread hint in the headers, and nothing moved where a message does not
fit or has not fully arrived. One attention and two expert ranks in this process, on one
segment (nothing in the calls waits)."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from moe_parallel import native
from moe_parallel.model.names import expert_name
from moe_parallel.model.packed import PackedExperts
from moe_parallel.parallel import shm
from moe_parallel.parallel.dispatch import Op, RemoteExperts, ShmPlane, Topology

pytestmark = pytest.mark.skipif(bool(shm.available() or native.reason()),
                                reason=f"no native shared-memory exchange here: {shm.available() or native.reason()}")

D, F = 64, 96


class _Instance:
    """Attention rank 0 and expert ranks 1..N of an A=1 instance, one segment mapped once per rank."""

    def __init__(self, experts: int, expert_ranks: int, dtype: torch.dtype, ring: int = 1 << 20, cores: int = 2):
        name = shm.PREFIX + "test_native_" + str(id(self))
        self.topo = Topology(1, expert_ranks, experts)
        segs = [shm.Segment.create(name, 1, expert_ranks, ring)]
        segs += [shm.Segment.open(name) for _ in range(expert_ranks)]
        shm.Segment.unlink(name)
        for r, s in enumerate(segs):
            s.join(r)
        self.attention = ShmPlane(self.topo, D, dtype, segs[0], 0, 1.0, cores=cores)
        self.experts = [ShmPlane(self.topo, D, dtype, s, r, 1.0) for r, s in enumerate(segs[1:], start=1)]

    def close(self) -> None:
        for p in (self.attention, *self.experts):
            p.close()


def _groups(experts: int, ranks: int, dtype: torch.dtype, seed: int = 0):
    """Random SwiGLU experts [E] (w1, w3 [F, D], w2 [D, F]) and each rank's packed share."""
    g = torch.Generator().manual_seed(seed)
    w = [[torch.randn(shape, generator=g).to(dtype) * 0.1 for shape in ((F, D), (F, D), (D, F))]
         for _ in range(experts)]
    x = experts // ranks
    groups = []
    for j in range(ranks):
        group = PackedExperts(range(j * x, (j + 1) * x), D, F, dtype)
        sinks = group.destinations(0)
        for e in range(j * x, (j + 1) * x):
            for name, t in zip(("w1", "w3", "w2"), w[e], strict=True):
                sinks[expert_name(0, e, name)].copy_(t)
        groups.append(group)
    return w, groups


def _swiglu(x: torch.Tensor, w) -> torch.Tensor:
    w1, w3, w2 = (t.float() for t in w)
    x = x.float()
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _route(t: int, k: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)])
    return ids, torch.rand(t, k, generator=g)


def _serve(inst: _Instance, groups, layer: int, native_side: bool) -> list[list[list[int]]]:
    """Every expert rank serves one LAYER; returns each rank's counts."""
    seen = []
    for plane, group in zip(inst.experts, groups, strict=True):
        op, got_layer, _, counts, rows = plane.receive(defer_rows=native_side)
        assert (op, got_layer) == (Op.LAYER, layer)
        seen.append(counts)
        if native_side:
            assert rows is None
            assert plane.serve_native(counts, group)
        else:
            ids = torch.cat([torch.full((n,), i) for i, n in enumerate(counts[0])]).long()
            plane.reply(native.fused_experts_rows(rows, ids, group.w13, group.w2, F), [rows.shape[0]])
    return seen


CASES = [(8, 2, 2, torch.float32), (8, 2, 2, torch.bfloat16), (4, 1, 4, torch.float32), (6, 3, 3, torch.bfloat16)]


@pytest.mark.parametrize(("experts", "k", "ranks", "dtype"), CASES,
                         ids=[f"e{e}-k{k}-n{n}-{str(d)[6:]}" for e, k, n, d in CASES])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_native_layer_matches_the_python_path_and_torch(monkeypatch, experts, k, ranks, dtype, tokens):
    calls = []
    plain = native.shm_dispatch
    monkeypatch.setattr(native, "shm_dispatch", lambda *a, **kw: calls.append(1) or plain(*a, **kw))
    w, groups = _groups(experts, ranks, dtype)
    inst = _Instance(experts, ranks, dtype)
    try:
        x = torch.randn(tokens, D).to(dtype)
        ids, weights = _route(tokens, k, experts, seed=tokens)
        outs = []
        for native_side in (True, False):  # both sides native, then both in Python
            inst.attention.native = native_side
            remote = RemoteExperts(inst.attention)
            pending = remote.start(7, 0, x, weights, ids)
            assert len(calls) == 1  # the native call sent it (and the Python path made none)
            counts = _serve(inst, groups, 7, native_side)
            outs.append((pending.wait(), pending.y.clone(), counts))
        (out, y, counts), (out_py, y_py, counts_py) = outs
        assert counts == counts_py
        per_rank = experts // ranks
        want = torch.bincount(ids.flatten(), minlength=experts).view(ranks, per_rank).tolist()
        assert [c[0] for c in counts] == want
        assert torch.equal(y, y_py) and torch.equal(out, out_py)
        ref = torch.zeros(tokens, D)
        for t in range(tokens):
            for j in range(k):
                ref[t] += weights[t, j] * _swiglu(x[t : t + 1], w[int(ids[t, j])])[0]
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(out.float(), ref, **tol)
    finally:
        inst.close()


def test_the_header_gives_a_lone_busy_rank_every_core():
    """cores=2, two expert ranks: both busy -> one thread each; every row on rank 0 -> rank 0
    asked for two (at most the CPUs it may use), rank 1 (no rows) for none (its own)."""
    w, groups = _groups(8, 2, torch.float32)
    inst = _Instance(8, 2, torch.float32, cores=2)
    most = len(os.sched_getaffinity(0))
    try:
        x = torch.randn(2, D)
        for ids, hints in (([[0, 5], [1, 6]], [1, 1]), ([[0, 1], [2, 3]], [min(2, most), 0])):
            pending = RemoteExperts(inst.attention).start(0, 0, x, torch.rand(2, 2), torch.tensor(ids))
            _serve(inst, groups, 0, True)
            assert [p.hint for p in inst.experts] == hints
            pending.wait()
    finally:
        inst.close()


def test_a_message_that_does_not_fit_its_ring_is_not_sent_natively():
    """A 4 KiB ring holds 15 rows of 256 bytes with their header; 40 tokens x top-2 send about
    40 rows to each rank: the native call sends nothing, and the Python path moves it in pieces."""
    inst = _Instance(8, 2, torch.float32, ring=4096)
    try:
        x = torch.randn(40, D)
        ids, weights = _route(40, 2, 8, seed=1)
        assert inst.attention.dispatch(0, 0, x, weights, ids, 8) is None
        lib = shm.library()
        assert [lib.moe_ring_ready(r.ctl) for r in inst.attention.out] == [0, 0]
    finally:
        inst.close()


def test_rows_not_yet_there_are_left_to_the_python_path():
    """A header announcing 2 rows whose rows have not arrived: `serve_native` moves nothing and
    says so; once they are there, the rows read from Python are the ones sent."""
    w, groups = _groups(8, 2, torch.float32)
    inst = _Instance(8, 2, torch.float32)
    try:
        a, e = inst.attention, inst.experts[0]
        a.fmt.pack_into(a.head_out, 0, ShmPlane.MAGIC | int(Op.LAYER), 0, 0, 2, 2, 0, 0, 0)
        a.out[0].send(a.head_out_ptr, a.fmt.size, "header")
        _, _, _, counts, rows = e.receive(defer_rows=True)
        assert rows is None and counts == [[2, 0, 0, 0]]
        assert not e.serve_native(counts, groups[0])
        sent = torch.randn(2, D)
        a.out[0].send(sent.data_ptr(), sent.numel() * 4, "token")
        assert torch.equal(e.rows(counts), sent)
    finally:
        inst.close()


def test_an_expert_id_out_of_range_is_an_error_not_a_write():
    inst = _Instance(8, 2, torch.float32)
    try:
        with pytest.raises(RuntimeError, match=r"expert id outside \[0, 8\)"):
            inst.attention.dispatch(0, 0, torch.randn(1, D), torch.rand(1, 2), torch.tensor([[1, 9]]), 8)
        assert [shm.library().moe_ring_ready(r.ctl) for r in inst.attention.out] == [0, 0]
    finally:
        inst.close()


def test_a_corrupted_ring_control_block_is_a_protocol_error_not_a_copy():
    """A ring whose producer count runs more than its capacity ahead of its consumer (a peer
    that scribbled over the control block) would make the room and readable counts wrap: both
    native calls refuse it before copying anything."""
    from moe_parallel.parallel.dispatch import ProtocolError

    w, groups = _groups(8, 2, torch.float32)
    inst = _Instance(8, 2, torch.float32, ring=4096)
    try:
        a, e = inst.attention, inst.experts[0]
        ring = a.out[0]
        head = torch.frombuffer((ctypes.c_uint64 * 1).from_address(ring.ctl), dtype=torch.int64)
        head[0] = 1 << 20  # the producer's count, far past the consumer's 0 in a 4 KiB ring
        with pytest.raises(ProtocolError, match="control block is corrupted"):
            a.dispatch(0, 0, torch.randn(1, D), torch.rand(1, 2), torch.tensor([[0, 5]]), 8)
        with pytest.raises(ProtocolError, match="control block is corrupted"):
            e.serve_native([[1, 0, 0, 0]], groups[0])
    finally:
        inst.close()
