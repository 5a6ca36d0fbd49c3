"""Expert parallelism across processes: attention ranks route tokens to expert ranks and back.

One `deepspeed.comm` group holds A attention ranks (global ranks 0..A-1) and N expert ranks
(A..A+N-1); expert rank j owns experts [j*E/N, (j+1)*E/N) of every layer. Per MoE layer:

1. header: an `all_to_all_single` of fixed-size int64 rows. Each attention rank tells each
   expert rank what comes next (`Op`), for which layer and micro-batch, and how many rows per
   local expert.
2. dispatch: `all_to_all_single` with uneven splits; each attention rank sends its routed rows,
   sorted by expert (hence by destination rank).
3. the expert ranks run their experts on what they got and send the results back the same way
   (combine), in the order they came, so the attention rank can weight and sum them.

The attention side posts all three exchanges at once, asynchronously (`RemoteExperts.start`),
and waits only when it needs the result (`Pending.wait`): with the batch split into
micro-batches (`pingpong.py`), it computes the attention of micro-batch i+1 while the expert
ranks compute micro-batch i. An attention rank knows every split size it needs (it receives
back exactly what it sent), so it never waits for a header; an expert rank serves the
(layer, micro-batch) pairs strictly in the order the headers announce them, and every rank
posts the exchanges in that same order, which is all a collective needs.

Expert ranks never get a call per layer: `ExpertServer.serve` loops on the headers until one
says SHUTDOWN. Every exchange, the first header of a step included, runs on one group whose
timeout is `comm_timeout_s`, so a dead or stuck peer is an error within that time on gloo and
on NCCL alike, never a hang. An idle instance stays within it because its driver sends a
HEARTBEAT header whenever no step has run for a while (`heartbeat_period`).

Every buffer is made on the plane's device (the rank's GPU under NCCL, the CPU under gloo, or
a GPU under gloo, which stages CUDA tensors through the host).

Shapes: T tokens, K experts per token, N routed rows (T*K), D hidden, E experts, X = E/N.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import deepspeed.comm as dist
import torch

from moe_parallel.devices import enter_thread
from moe_parallel.experts import ExpertGroup, expert_counts
from moe_parallel.moe import combine, routed_tokens
from moe_parallel.profile import section
from moe_parallel.staging import Staging


class Op(IntEnum):
    IDLE = 0  # rows that carry nothing (sent to ranks that are not expert ranks)
    LAYER = 1
    STEP_DONE = 2
    SHUTDOWN = 3
    HEARTBEAT = 4  # between steps only: "the driver is alive, keep waiting"
    WARMUP_DONE = 5  # ends a step that is not traffic (sizing the KV pool): its rows are not counted


class ProtocolError(RuntimeError):
    """The ranks of a model instance disagree about what comes next."""


class PeerLost(RuntimeError):
    """An exchange with the other ranks failed: one died, hung past the timeout, or left."""


def _exchange(what: str, *args, **kwargs) -> None:
    try:
        dist.all_to_all_single(*args, **kwargs)
    except RuntimeError as exc:
        raise PeerLost(f"{what} exchange with the instance's other ranks failed: {exc}") from exc


def _post(what: str, *args, **kwargs):
    """The same exchange, started: returns (what, work) to `_finish`."""
    try:
        return what, dist.all_to_all_single(*args, **kwargs, async_op=True)
    except RuntimeError as exc:
        raise PeerLost(f"{what} exchange with the instance's other ranks failed: {exc}") from exc


def _finish(posted) -> None:
    what, work = posted
    try:
        work.wait()
    except RuntimeError as exc:
        raise PeerLost(f"{what} exchange with the instance's other ranks failed: {exc}") from exc


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
    """The instance's process group seen from one rank, and the two exchanges it makes over it."""

    def __init__(self, topo: Topology, hidden: int, dtype: torch.dtype, device: torch.device):
        self.topo, self.hidden, self.dtype, self.device = topo, hidden, dtype, device

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

    def nothing(self) -> torch.Tensor:
        return torch.empty(0, self.hidden, dtype=self.dtype, device=self.device)


@dataclass
class Pending:
    """One micro-batch's MoE on its way through the expert ranks; `wait()` gives its output [T, D]."""

    posted: list
    y: torch.Tensor  # [N, D] filled by the combine exchange
    weights: torch.Tensor  # [N] router weights, in the sent order
    token: torch.Tensor  # [N] the token of each sent row
    num_tokens: int
    keep: tuple = ()  # send buffers: alive until the exchanges are done

    def wait(self) -> torch.Tensor:
        with section("dispatch"):  # waiting for the expert ranks is counted where it happens
            for posted in self.posted:
                _finish(posted)
        with section("combine"):
            return combine(self.y, self.weights, self.token, self.num_tokens)


class RemoteExperts:
    """Attention-rank side: the experts backend that lives on the expert ranks."""

    def __init__(self, plane: DataPlane):
        self.plane, self.topo = plane, plane.topo

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.start(layer, 0, x, weights, ids).wait()

    def start(self, layer: int, micro_batch: int, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> Pending:
        """Post the header, dispatch and combine exchanges of one micro-batch; return at once."""
        t, k = ids.shape
        with section("dispatch"):
            flat = ids.flatten()
            order = torch.argsort(flat, stable=True)  # rows sorted by expert, so by destination rank
            token = routed_tokens(t, k, x.device)[order]  # [N]
            counts = expert_counts(flat, self.topo.num_experts).view(self.topo.expert_ranks, -1)
            header = self._header(Op.LAYER, layer, micro_batch, counts)
            # the split sizes: the one value the host must read (the exchange is sized from it)
            send = [0] * self.topo.attention_ranks + counts.sum(1).tolist()
            nothing = [0] * self.topo.world
            rows = x.index_select(0, token)  # [N, D]
            y = torch.empty(rows.shape, dtype=self.plane.dtype, device=self.plane.device)
            received = torch.empty_like(header)
            posted = [_post("header", received, header),
                      _post("token", self.plane.nothing(), rows, output_split_sizes=nothing, input_split_sizes=send),
                      _post("token", y, self.plane.nothing(), output_split_sizes=send, input_split_sizes=nothing)]
        return Pending(posted, y, weights.flatten()[order], token, t, keep=(header, received, rows))

    def step_done(self, warmup: bool = False) -> None:
        self._send_header(Op.WARMUP_DONE if warmup else Op.STEP_DONE)

    def heartbeat(self) -> None:
        self._send_header(Op.HEARTBEAT)

    def shutdown(self) -> None:
        self._send_header(Op.SHUTDOWN)

    def _header(self, op: Op, layer: int = 0, micro_batch: int = 0,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.plane.header_rows()
        a = self.topo.attention_ranks
        rows[a:, 0], rows[a:, 1], rows[a:, 2] = int(op), layer, micro_batch
        if counts is not None:
            rows[a:, 3:] = counts
        return rows

    def _send_header(self, op: Op) -> None:
        self.plane.headers(self._header(op))


class ExpertServer:
    """Expert-rank side: serve layer after layer until the attention ranks say shut down."""

    def __init__(self, plane: DataPlane, groups: list[ExpertGroup], tensors_read: int = 0):
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
        while True:
            op, layer, micro_batch, counts = self._receive_header()
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
            if (layer, micro_batch) not in ((last[0], last[1] + 1), (last[0] + 1, 0)):
                raise ProtocolError(f"after layer {last[0]} micro-batch {last[1]}, attention ranks sent layer "
                                    f"{layer} micro-batch {micro_batch}")
            self._serve_layer(layer, counts)
            last = (layer, micro_batch)

    def _no_counts(self) -> list[list[int]]:
        return [[0] * self.topo.experts_per_rank for _ in self.groups]

    def _end_step(self, counted: bool) -> None:
        if counted:
            self.tokens_per_expert += torch.tensor(self._step_counts, dtype=torch.int64)
            self.steps += 1
        self._step_counts = self._no_counts()

    def _receive_header(self) -> tuple[Op, int, int, list[list[int]]]:
        got = self.plane.headers(self.plane.header_rows())[: self.topo.attention_ranks].tolist()  # [A, W]
        heads = {tuple(row[:3]) for row in got}
        if len(heads) != 1:
            raise ProtocolError(f"attention ranks disagree on (op, layer, micro-batch): {sorted(heads)}")
        op, layer, micro_batch = heads.pop()
        return Op(op), layer, micro_batch, [row[3:] for row in got]

    def _serve_layer(self, layer: int, counts: list[list[int]]) -> None:
        """`counts[a][x]`: rows attention rank a sends for local expert x (from the header, on the host)."""
        recv = [sum(row) for row in counts] + [0] * self.topo.expert_ranks  # rows from each attention rank
        nothing = [0] * self.topo.world
        x = self.plane.rows(self.plane.nothing(), nothing, recv)
        flat = [n for row in counts for n in row]
        local = torch.arange(self.topo.experts_per_rank, device=self.plane.device).repeat(self.topo.attention_ranks)
        self.staging.reset()
        local_ids = local.repeat_interleave(self.staging.put(flat, torch.int64), output_size=sum(flat))  # [rows]
        with section("experts"):
            y = self.groups[layer](x, local_ids)
        self.plane.rows(y, recv, nothing)
        per_expert = [sum(col) for col in zip(*counts, strict=True)]
        self._step_counts[layer] = [a + n for a, n in zip(self._step_counts[layer], per_expert, strict=True)]
