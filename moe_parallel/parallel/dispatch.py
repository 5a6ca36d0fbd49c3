"""Expert parallelism across processes: attention ranks route tokens to expert ranks and back.

One instance holds A attention ranks (global ranks 0..A-1) and N expert ranks (A..A+N-1);
expert rank j owns experts [j*E/N, (j+1)*E/N) of every layer. Per MoE layer each attention
rank tells each expert rank what comes next (`Op`), for which layer and micro-batch, and how
many rows per local expert (the header); sends its routed rows, sorted by expert (hence by
destination rank) (the dispatch); the expert ranks run their experts and send the results back
in the order they came (the combine), so the attention rank can weight and sum them. Two
transports carry it, behind one interface (`DataPlane`):

- `CollectivePlane`: `deepspeed.comm` `all_to_all_single` on the instance's group (NCCL between
  GPUs, gloo otherwise): three collectives a layer, header, dispatch, combine. An uneven
  all-to-all needs its split sizes before it starts, so the header is its own call.
- `ShmPlane` (`moe_parallel/parallel/shm.py`): all ranks on the CPU of one host; a byte ring per rank
  pair in one shared-memory segment. The header travels in front of its rows (one message
  each way per layer and expert rank), and the expert rank learns the sizes from it. With the
  native library, a layer whose messages fit the rings is one call on each side
  (`native.shm_dispatch`: sort, gather into the rings, wake; `native.shm_expert_layer`: rows
  in, the fused rows MoE, outputs back); a message that does not fit goes through the rings
  from Python, with waits between pieces. Both write the same bytes.

`exchange: auto` picks shm where every rank can map the same segment, gloo/NCCL otherwise
(`shm.setup`). The attention side posts a micro-batch's exchange and returns
(`RemoteExperts.start`), and waits only when it needs the result (`Pending.wait`): with the
batch split into micro-batches (`model/decoder.py`, `CausalLM.run`), it computes the attention of micro-batch i+1
while the expert ranks compute micro-batch i. An attention rank knows every size it receives
(exactly what it sent); an expert rank serves the (layer, micro-batch) pairs strictly in the
order the headers announce them.

Expert ranks never get a call per layer: `ExpertServer.serve` loops on the headers until one
says SHUTDOWN. Every wait is bounded by `comm_timeout_s` (the group's timeout on gloo and
NCCL; no progress of the ring on shm, where a peer that died or left is seen at once), so a
dead or stuck peer is a `PeerLost` within that time, never a hang. An idle instance stays
within it because its driver sends a HEARTBEAT header whenever no step has run for a while
(`heartbeat_period`). A malformed header is a `ProtocolError`.

Every buffer is made on the plane's device (the rank's GPU under NCCL, the CPU under gloo and
shm, or a GPU under gloo, which stages CUDA tensors through the host).

Shapes: T tokens, K experts per token, N routed rows (T*K), D hidden, E experts, X = E/N.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from functools import partial

import deepspeed.comm as dist
import torch

from moe_parallel import native
from moe_parallel.model.experts import Experts, sort_by_expert
from moe_parallel.model.moe import combine, routed_tokens
from moe_parallel.model.packed import PackedExperts
from moe_parallel.parallel.shm import PeerLost, ProtocolError, Segment
from moe_parallel.runtime.devices import enter_thread
from moe_parallel.runtime.profile import section
from moe_parallel.runtime.staging import Staging

__all__ = ["CollectivePlane", "DataPlane", "ExpertServer", "Op", "PeerLost", "ProtocolError", "RemoteExperts",
           "ShmPlane", "Topology", "heartbeat_period", "make_plane"]


class Op(IntEnum):
    LAYER = 1
    STEP_DONE = 2
    SHUTDOWN = 3
    HEARTBEAT = 4  # between steps only: "the driver is alive, keep waiting"
    WARMUP_DONE = 5  # ends a step that is not traffic (sizing the KV pool): its rows are not counted


@contextmanager
def _peer_lost(what: str):
    """A failed collective is a lost peer (the group's timeout, or a peer that left)."""
    try:
        yield
    except RuntimeError as exc:
        raise PeerLost(f"{what} exchange with the instance's other ranks failed: {exc}") from exc


def _exchange(what: str, *args, **kwargs) -> None:
    with _peer_lost(what):
        dist.all_to_all_single(*args, **kwargs)


def _post(what: str, *args, **kwargs):
    """The same exchange, started: returns (what, work) to `_finish`."""
    with _peer_lost(what):
        return what, dist.all_to_all_single(*args, **kwargs, async_op=True)


def _finish(posted) -> None:
    what, work = posted
    with _peer_lost(what):
        work.wait()


@dataclass(frozen=True)
class Topology:
    attention_ranks: int
    expert_ranks: int
    num_experts: int

    def __post_init__(self):
        if self.attention_ranks < 1 or self.expert_ranks < 1:
            raise ValueError("a disaggregated instance needs at least one attention and one expert rank")
        if self.num_experts % self.expert_ranks:
            raise ValueError(f"expert_groups={self.expert_ranks} does not divide the model's "
                             f"{self.num_experts} experts per layer")

    @property
    def world(self) -> int:
        return self.attention_ranks + self.expert_ranks

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.expert_ranks

    @property
    def header_width(self) -> int:
        return 3 + self.experts_per_rank  # op, layer, micro-batch, rows per local expert

    def experts_of(self, expert_index: int) -> range:
        x = self.experts_per_rank
        return range(expert_index * x, (expert_index + 1) * x)


def heartbeat_period(comm_timeout_s: float) -> float:
    """How long an instance may sit idle before its driver sends a heartbeat: well inside the
    timeout, so one late beat is not yet a failure."""
    return max(0.05, comm_timeout_s / 4)


class DataPlane:
    """The instance's data plane seen from one rank. Attention side: `post` a micro-batch's
    layer (or a control `Op`), `wait` for what comes back. Expert side: `receive` the next
    header (and its rows), `reply` with the outputs."""

    kind = "?"

    def __init__(self, topo: Topology, hidden: int, dtype: torch.dtype, device: torch.device):
        self.topo, self.hidden, self.dtype, self.device = topo, hidden, dtype, device

    def nothing(self) -> torch.Tensor:
        return torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)

    # attention side
    def post(self, op: Op, layer: int, micro_batch: int, counts: torch.Tensor | None, rows: torch.Tensor,
             y: torch.Tensor, sizes: list[int]):
        """Send header and rows (`counts` [N, X] rows per expert, `sizes` [N] their sums per
        expert rank, `rows` [sum, D] in that order) and start receiving the outputs into `y`;
        returns a handle for `wait`. A control op sends only its header (`counts` None)."""
        raise NotImplementedError

    def wait(self, handle) -> None:
        raise NotImplementedError

    def control(self, op: Op) -> None:
        self.wait(self.post(op, 0, 0, None, self.nothing(), self.nothing(), [0] * self.topo.expert_ranks))

    # expert side
    def receive(self, defer_rows: bool = False) -> tuple[Op, int, int, list[list[int]], torch.Tensor | None]:
        """The next (op, layer, micro-batch, counts [A][X], rows [sum, D] for a LAYER, else None).
        `defer_rows`: a plane that can serve a layer in one call (`serve_native`) leaves a
        LAYER's rows where they are and returns None for them; `rows(counts)` reads them."""
        raise NotImplementedError

    def dispatch(self, layer: int, micro_batch: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 num_experts: int):
        """A LAYER's whole exchange in one native call where this plane has one and it fits:
        (handle for `wait`, outputs y [N, D], router weight [N] and token [N] of each sent row),
        else None (the caller posts it)."""
        return None

    def serve_native(self, counts: list[list[int]], group: Experts) -> bool:
        """Serve a deferred LAYER in one native call; False when it cannot (nothing moved)."""
        return False

    def rows(self, counts: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    def reply(self, y: torch.Tensor, sizes: list[int]) -> None:
        """Send `y` [sum(sizes), D] back, sizes[a] rows to attention rank a, in the order received."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    @staticmethod
    def agree(heads: list[tuple[int, int, int]]) -> tuple[Op, int, int]:
        if len(set(heads)) != 1:
            raise ProtocolError(f"attention ranks disagree on (op, layer, micro-batch): {sorted(set(heads))}")
        op, layer, micro_batch = heads[0]
        try:
            return Op(op), layer, micro_batch
        except ValueError:
            raise ProtocolError(f"unknown op {op} in a header") from None


class CollectivePlane(DataPlane):
    """`deepspeed.comm` all-to-alls on the instance's group: header, dispatch, combine."""

    def __init__(self, topo: Topology, hidden: int, dtype: torch.dtype, device: torch.device, kind: str = "gloo"):
        super().__init__(topo, hidden, dtype, device)
        self.kind = kind

    def header_rows(self) -> torch.Tensor:
        return torch.zeros(self.topo.world, self.topo.header_width, dtype=torch.int64, device=self.device)

    def headers(self, rows: torch.Tensor) -> torch.Tensor:
        """Send row r of `rows` [world, W] to rank r; return the rows received [world, W]."""
        out = torch.empty_like(rows)
        _exchange("header", out, rows)
        return out

    def rows(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Uneven all-to-all of rows [sum(send), D] -> [sum(recv), D]."""
        out = torch.empty(sum(recv), self.hidden, dtype=self.dtype, device=self.device)
        _exchange("token", out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
        return out

    def _header(self, op: Op, layer: int, micro_batch: int, counts: torch.Tensor | None) -> torch.Tensor:
        rows = self.header_rows()
        a = self.topo.attention_ranks
        rows[a:, 0], rows[a:, 1], rows[a:, 2] = int(op), layer, micro_batch
        if counts is not None:
            rows[a:, 3:] = counts
        return rows

    def post(self, op, layer, micro_batch, counts, rows, y, sizes):
        header = self._header(op, layer, micro_batch, counts)
        if counts is None:
            self.headers(header)
            return []
        send, nothing = [0] * self.topo.attention_ranks + sizes, [0] * self.topo.world
        received = torch.empty_like(header)
        return [_post("header", received, header),
                _post("token", self.nothing(), rows, output_split_sizes=nothing, input_split_sizes=send),
                _post("token", y, self.nothing(), output_split_sizes=send, input_split_sizes=nothing),
                (header, received, rows)]  # send buffers: alive until the exchanges are done

    def wait(self, handle) -> None:
        for posted in handle[:-1]:
            _finish(posted)

    def receive(self, defer_rows=False):
        got = self.headers(self.header_rows())[: self.topo.attention_ranks].tolist()  # [A, W]
        op, layer, micro_batch = self.agree([tuple(row[:3]) for row in got])
        counts = [row[3:] for row in got]
        if op != Op.LAYER:
            return op, layer, micro_batch, counts, None
        recv = [sum(row) for row in counts] + [0] * self.topo.expert_ranks
        return op, layer, micro_batch, counts, self.rows(self.nothing(), [0] * self.topo.world, recv)

    def reply(self, y, sizes):
        self.rows(y, sizes + [0] * self.topo.expert_ranks, [0] * self.topo.world)


class ShmPlane(DataPlane):
    """Byte rings in one shared-memory segment (`moe_parallel/parallel/shm.py`), CPU ranks of one host.
    A message is a header [magic|op, layer, micro-batch, rows, rows per local expert...] (int64)
    followed by its rows; the combine is the rows alone (the attention rank knows how many)."""

    kind = "shm"
    MAGIC = 0x4D4F45 << 8  # in the header's first word, above the op; bits 32+: threads to use (0: own)

    def __init__(self, topo: Topology, hidden: int, dtype: torch.dtype, seg: Segment, rank: int,
                 timeout_s: float, max_rows: int = 1 << 20, cores: int = 0):
        """`cores`: the host's cores the instance's ranks have between them (`host_cores`); an
        attention rank splits them among the expert ranks that have rows, in each header."""
        super().__init__(topo, hidden, dtype, torch.device("cpu"))
        self.rank, self.max_rows, self.cores = rank, max_rows, cores
        self.hint = 0  # threads the last LAYER's headers asked for (0: this rank's own)
        self.most = len(os.sched_getaffinity(0))
        self.row_bytes = hidden * dtype.itemsize
        self.fmt = struct.Struct(f"<{4 + topo.experts_per_rank}q")
        self.seg = seg
        a = topo.attention_ranks
        if rank < a:  # rings to and from every expert rank
            self.out = [seg.ring(rank, j, True, timeout_s) for j in range(topo.expert_ranks)]
            self.inc = [seg.ring(rank, j, False, timeout_s) for j in range(topo.expert_ranks)]
            self.expect: list[deque] = [deque() for _ in range(topo.expert_ranks)]  # [address, bytes, done]
        else:
            j = rank - a
            self.inc = [seg.ring(r, j, True, timeout_s) for r in range(a)]
            self.out = [seg.ring(r, j, False, timeout_s) for r in range(a)]
        # (control, data) addresses of the rings, for the native layer calls
        self.native = native.available()
        self.out_table = torch.tensor([[r.ctl, r.data] for r in self.out], dtype=torch.int64, device="cpu")
        self.in_table = torch.tensor([[r.ctl, r.data] for r in self.inc], dtype=torch.int64, device="cpu")
        self.heads = [ctypes.create_string_buffer(self.fmt.size) for _ in self.inc]
        self.head_out = ctypes.create_string_buffer(self.fmt.size)
        self.head_ptrs = [ctypes.addressof(h) for h in self.heads]
        self.head_out_ptr = ctypes.addressof(self.head_out)

    # attention side
    def post(self, op, layer, micro_batch, counts, rows, y, sizes):
        per_rank = counts.tolist() if counts is not None else [[0] * self.topo.experts_per_rank] * len(sizes)
        rows, b = rows.contiguous(), self.row_bytes
        handle, at = [], 0
        for j, n in enumerate(sizes):  # receive first: the drain may see outputs before the last send
            if n:
                entry = [y.data_ptr() + at * b, n * b, 0]
                self.expect[j].append(entry)
                handle.append((j, entry))
            at += n
        at = 0
        for j, n in enumerate(sizes):
            self.fmt.pack_into(self.head_out, 0, self.MAGIC | int(op), layer, micro_batch, n, *per_rank[j])
            self.out[j].send(self.head_out_ptr, self.fmt.size, "header", self._drain)
            if n:
                self.out[j].send(rows.data_ptr() + at * b, n * b, "token", self._drain)
            at += n
        return handle

    def dispatch(self, layer, micro_batch, x, weights, ids, num_experts):
        if not self.native or x.dtype != self.dtype:
            return None
        try:
            sent = native.shm_dispatch(x, ids, weights, num_experts, self.out_table, self.seg.cap,
                                       self.MAGIC | int(Op.LAYER), layer, micro_batch, self.cores)
        except RuntimeError as exc:  # an id out of range, a corrupted ring: nothing was sent
            raise ProtocolError(str(exc)) from exc
        if not sent:
            return None
        token, weight, sizes = sent
        b = self.row_bytes
        y = torch.empty(token.shape[0], self.hidden, dtype=self.dtype, device=self.device)
        handle, at = [], 0
        for j, n in enumerate(sizes.tolist()):
            if n:
                entry = [y.data_ptr() + at * b, n * b, 0]
                self.expect[j].append(entry)
                handle.append((j, entry))
            at += n
        return handle, y, weight, token

    def wait(self, handle) -> None:
        for j, entry in handle:
            queue, ring = self.expect[j], self.inc[j]
            while entry[2] < entry[1]:  # earlier micro-batches first: a ring is in order
                head = queue[0]
                ring.recv(head[0] + head[2], head[1] - head[2], "combine")
                head[2] = head[1]
                queue.popleft()

    def _drain(self) -> None:
        """Read whatever outputs have arrived (an outgoing ring is full: the expert rank may be
        waiting for room to send them)."""
        for queue, ring in zip(self.expect, self.inc, strict=True):
            while queue:
                head = queue[0]
                head[2] += ring.poll(head[0] + head[2], head[1] - head[2])
                if head[2] < head[1]:
                    break
                queue.popleft()

    # expert side
    def receive(self, defer_rows=False):
        heads, counts, hints = [], [], []
        for a, ring in enumerate(self.inc):
            ring.recv(self.head_ptrs[a], self.fmt.size, "header")
            word, layer, micro_batch, n, *per_expert = self.fmt.unpack_from(self.heads[a], 0)
            hints.append(word >> 32)
            if word & 0xFFFFFF00 != self.MAGIC:
                raise ProtocolError(f"malformed header from attention rank {a}: first word {word:#x}")
            if min(per_expert) < 0 or sum(per_expert) != n or n > self.max_rows:
                raise ProtocolError(f"attention rank {a} announced {n} rows as {per_expert} per expert "
                                    f"(at most {self.max_rows} rows)")
            heads.append((word & 0xFF, layer, micro_batch))
            counts.append(per_expert)
        op, layer, micro_batch = self.agree(heads)
        # the least any attention rank asked for: each sees only its own rows, and one that sent
        # none (or a message through the Python path) asks for 0, this rank's own threads
        self.hint = min(min(hints), self.most)
        if op != Op.LAYER:
            if any(sum(c) for c in counts):
                raise ProtocolError(f"{op.name} header announced rows")
            return op, layer, micro_batch, counts, None
        if defer_rows:
            return op, layer, micro_batch, counts, None
        return op, layer, micro_batch, counts, self.rows(counts)

    def rows(self, counts):
        sizes = [sum(c) for c in counts]
        x = torch.empty(sum(sizes), self.hidden, dtype=self.dtype, device=self.device)
        at = 0
        for ring, n in zip(self.inc, sizes, strict=True):
            if n:
                ring.recv(x.data_ptr() + at * self.row_bytes, n * self.row_bytes, "token")
            at += n
        return x

    def serve_native(self, counts, group):
        if not (self.native and isinstance(group, PackedExperts) and group.act_dtype == self.dtype):
            return False
        counts = torch.tensor(counts, dtype=torch.int64, device="cpu")
        try:
            return native.shm_expert_layer(counts, self.in_table, self.out_table, self.seg.cap, group.w13,
                                           group.w2, self.hidden, group.intermediate, self.dtype, self.hint,
                                           **group.scales)
        except RuntimeError as exc:  # a corrupted ring: nothing was moved
            raise ProtocolError(str(exc)) from exc

    def reply(self, y, sizes):
        y, at = y.contiguous(), 0
        for ring, n in zip(self.out, sizes, strict=True):
            if n:
                ring.send(y.data_ptr() + at * self.row_bytes, n * self.row_bytes, "combine")
            at += n

    def close(self) -> None:
        self.seg.close()


def make_plane(topo: Topology, hidden: int, dtype: torch.dtype, device: torch.device, seg: Segment | None = None,
               rank: int = 0, timeout_s: float = 60.0, kind: str = "gloo", cores: int = 0) -> DataPlane:
    """The shm plane on a joined segment, else the collectives of the instance's group."""
    if seg is not None:
        return ShmPlane(topo, hidden, dtype, seg, rank, timeout_s, cores=cores)
    return CollectivePlane(topo, hidden, dtype, device, kind)


@dataclass
class Pending:
    """One micro-batch's MoE on its way through the expert ranks; `wait()` gives its output [T, D]."""

    plane: DataPlane
    handle: object
    y: torch.Tensor  # [N, D] filled by the combine
    weights: torch.Tensor  # [N] router weights, in the sent order
    token: torch.Tensor  # [N] the token of each sent row
    num_tokens: int

    def wait(self) -> torch.Tensor:
        with section("dispatch"):  # waiting for the expert ranks is counted where it happens
            self.plane.wait(self.handle)
        with section("combine"):
            return combine(self.y, self.weights, self.token, self.num_tokens)


class RemoteExperts:
    """Attention-rank side: the experts backend that lives on the expert ranks."""

    def __init__(self, plane: DataPlane):
        self.plane, self.topo = plane, plane.topo

    def start(self, layer: int, micro_batch: int, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> Pending:
        """Post the header, dispatch and combine of one micro-batch; return without waiting for the outputs."""
        t, k = ids.shape
        with section("dispatch"):
            sent = self.plane.dispatch(layer, micro_batch, x, weights, ids, self.topo.num_experts)
            if sent is not None:
                handle, y, weight, token = sent
                return Pending(self.plane, handle, y, weight, token, t)
            order, counts = sort_by_expert(ids.flatten(), self.topo.num_experts)  # by expert, so by rank
            token = routed_tokens(t, k, x.device)[order]  # [N]
            counts = counts.view(self.topo.expert_ranks, -1)
            # the split sizes: the one value the host must read (the exchange is sized from it)
            sizes = counts.sum(1).tolist()
            rows = x.index_select(0, token)  # [N, D]
            y = torch.empty(rows.shape, dtype=self.plane.dtype, device=self.plane.device)
            handle = self.plane.post(Op.LAYER, layer, micro_batch, counts, rows, y, sizes)
        return Pending(self.plane, handle, y, weights.flatten()[order], token, t)

    def step_done(self, warmup: bool = False) -> None:
        self.plane.control(Op.WARMUP_DONE if warmup else Op.STEP_DONE)

    def heartbeat(self) -> None:
        self.plane.control(Op.HEARTBEAT)

    def shutdown(self) -> None:
        self.plane.control(Op.SHUTDOWN)


class ExpertServer:
    """Expert-rank side: serve layer after layer until the attention ranks say shut down."""

    def __init__(self, plane: DataPlane, groups: list[Experts], tensors_read: int = 0):
        self.plane, self.topo, self.groups = plane, plane.topo, groups
        self.tensors_read = tensors_read  # checkpoint tensors loaded for `groups`
        # counted on the host, from the headers: reading them (health probes) never waits for the device
        self.tokens_per_expert = torch.zeros(len(groups), self.topo.experts_per_rank, dtype=torch.int64)
        self._step_counts = self._no_counts()  # this step's [layer][local expert], until it ends
        self.staging = Staging(plane.device, size=1 << 12)  # the local expert ids' repeats, pinned on CUDA
        self.steps = self.heartbeats = 0

    @torch.inference_mode()
    def serve(self) -> None:
        """Layers in order; within a layer, micro-batches 0, 1, ... as many as the step uses."""
        enter_thread()
        last = (-1, -1)  # the (layer, micro-batch) served last in this step
        defer = isinstance(self.plane, ShmPlane) and self.plane.native  # rows left for `serve_native`
        receive = partial(self.plane.receive, defer_rows=True) if defer else self.plane.receive
        while True:
            op, layer, micro_batch, counts, x = receive()
            if op == Op.SHUTDOWN:
                return
            if op == Op.HEARTBEAT:
                if last != (-1, -1):
                    raise ProtocolError(f"heartbeat in the middle of a step (after layer {last[0]})")
                self.heartbeats += 1
                continue
            if op in (Op.STEP_DONE, Op.WARMUP_DONE):
                if last[0] != len(self.groups) - 1:
                    raise ProtocolError(f"step ended after layer {last[0]} of {len(self.groups)}")
                self._end_step(counted=op == Op.STEP_DONE)
                last = (-1, -1)
                continue
            if op != Op.LAYER or (layer, micro_batch) not in ((last[0], last[1] + 1), (last[0] + 1, 0)) \
                    or layer >= len(self.groups):
                raise ProtocolError(f"after layer {last[0]} micro-batch {last[1]}, attention ranks sent "
                                    f"{op.name} layer {layer} micro-batch {micro_batch}")
            self._serve_layer(layer, counts, x)
            last = (layer, micro_batch)

    def _no_counts(self) -> list[list[int]]:
        return [[0] * self.topo.experts_per_rank for _ in self.groups]

    def _end_step(self, counted: bool) -> None:
        if counted:
            self.tokens_per_expert += torch.tensor(self._step_counts, dtype=torch.int64)
            self.steps += 1
        self._step_counts = self._no_counts()

    def _serve_layer(self, layer: int, counts: list[list[int]], x: torch.Tensor | None) -> None:
        """`counts[a][x]`: rows attention rank a sent for local expert x (from the header, on the
        host); `x` those rows, attention rank by attention rank, each sorted by expert (None: still
        in the plane, which serves the layer in one native call where it can)."""
        per_expert = [sum(col) for col in zip(*counts, strict=True)]
        self._step_counts[layer] = [a + n for a, n in zip(self._step_counts[layer], per_expert, strict=True)]
        if x is None:
            with section("experts", keep=True):  # one sample per layer, whichever path serves it
                if self.plane.serve_native(counts, self.groups[layer]):
                    return
                self._compute(layer, counts, self.plane.rows(counts))
            return
        self._compute(layer, counts, x)

    def _compute(self, layer: int, counts: list[list[int]], x: torch.Tensor) -> None:
        flat = [n for row in counts for n in row]
        local = torch.arange(self.topo.experts_per_rank, device=self.plane.device).repeat(self.topo.attention_ranks)
        self.staging.reset()
        local_ids = local.repeat_interleave(self.staging.put(flat, torch.int64), output_size=sum(flat))  # [rows]
        with section("experts", keep=True):  # kept: the bench lines layers up across expert ranks
            y = self.groups[layer](x, local_ids)
        self.plane.reply(y, [sum(row) for row in counts])
