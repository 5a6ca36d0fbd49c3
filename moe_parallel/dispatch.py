"""Expert parallelism across processes: attention ranks route tokens to expert ranks and back.

One `deepspeed.comm` group holds A attention ranks (global ranks 0..A-1) and N expert ranks
(A..A+N-1); expert rank j owns experts [j*E/N, (j+1)*E/N) of every layer. Per MoE layer:

1. header: an `all_to_all_single` of fixed-size int64 rows. Each attention rank tells each
   expert rank what comes next (`Op`), for which layer, and how many rows per local expert.
2. dispatch: `all_to_all_single` with uneven splits; each attention rank sends its routed rows,
   sorted by expert (hence by destination rank).
3. the expert ranks run their experts on what they got and send the results back the same way
   (combine), in the order they came, so the attention rank can weight and sum them.

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
from moe_parallel.experts import ExpertGroup
from moe_parallel.moe import combine, routed_tokens
from moe_parallel.profile import section


class Op(IntEnum):
    IDLE = 0  # rows that carry nothing (sent to ranks that are not expert ranks)
    LAYER = 1
    STEP_DONE = 2
    SHUTDOWN = 3
    HEARTBEAT = 4  # between steps only: "the driver is alive, keep waiting"


class ProtocolError(RuntimeError):
    """The ranks of a model instance disagree about what comes next."""


class PeerLost(RuntimeError):
    """An exchange with the other ranks failed: one died, hung past the timeout, or left."""


def _exchange(what: str, *args, **kwargs) -> None:
    try:
        dist.all_to_all_single(*args, **kwargs)
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
        return 2 + self.experts_per_rank

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


class RemoteExperts:
    """Attention-rank side: the experts backend that lives on the expert ranks."""

    def __init__(self, plane: DataPlane):
        self.plane, self.topo = plane, plane.topo

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t, k = ids.shape
        with section("dispatch"):  # includes waiting for the expert ranks to compute
            flat = ids.flatten()
            order = torch.argsort(flat, stable=True)  # rows sorted by expert, so by destination rank
            token = routed_tokens(t, k, x.device)[order]  # [N]
            counts = torch.bincount(flat, minlength=self.topo.num_experts).view(self.topo.expert_ranks, -1)
            self._send_header(Op.LAYER, layer, counts)
            send = [0] * self.topo.attention_ranks + counts.sum(1).tolist()
            nothing = [0] * self.topo.world
            self.plane.rows(x.index_select(0, token), send, nothing)  # dispatch
            y = self.plane.rows(self.plane.nothing(), nothing, send)  # results come back in order
        with section("combine"):
            return combine(y, weights.flatten()[order], token, t)

    def step_done(self) -> None:
        self._send_header(Op.STEP_DONE, 0, None)

    def heartbeat(self) -> None:
        self._send_header(Op.HEARTBEAT, 0, None)

    def shutdown(self) -> None:
        self._send_header(Op.SHUTDOWN, 0, None)

    def _send_header(self, op: Op, layer: int, counts: torch.Tensor | None) -> None:
        rows = self.plane.header_rows()
        a = self.topo.attention_ranks
        rows[a:, 0], rows[a:, 1] = int(op), layer
        if counts is not None:
            rows[a:, 2:] = counts
        self.plane.headers(rows)


class ExpertServer:
    """Expert-rank side: serve layer after layer until the attention ranks say shut down."""

    def __init__(self, plane: DataPlane, groups: list[ExpertGroup], tensors_read: int = 0):
        self.plane, self.topo, self.groups = plane, plane.topo, groups
        self.tensors_read = tensors_read  # checkpoint tensors loaded for `groups`
        self.tokens_per_expert = torch.zeros(len(groups), self.topo.experts_per_rank, dtype=torch.int64,
                                             device=plane.device)
        self.steps = self.heartbeats = 0

    @torch.inference_mode()
    def serve(self) -> None:
        enter_thread()
        next_layer = 0
        while True:
            op, layer, counts = self._receive_header()
            if op == Op.SHUTDOWN:
                return
            if op == Op.HEARTBEAT:
                if next_layer:
                    raise ProtocolError(f"heartbeat in the middle of a step (after layer {next_layer - 1})")
                self.heartbeats += 1
                continue
            if op == Op.STEP_DONE:
                if next_layer != len(self.groups):
                    raise ProtocolError(f"step ended after layer {next_layer - 1} of {len(self.groups)}")
                next_layer, self.steps = 0, self.steps + 1
                continue
            if layer != next_layer:
                raise ProtocolError(f"expected layer {next_layer}, attention ranks sent layer {layer}")
            self._serve_layer(layer, counts)
            next_layer += 1

    def _receive_header(self) -> tuple[Op, int, list[list[int]]]:
        got = self.plane.headers(self.plane.header_rows())[: self.topo.attention_ranks].tolist()  # [A, W]
        ops, layers = {row[0] for row in got}, {row[1] for row in got}
        if len(ops) != 1 or len(layers) != 1:
            raise ProtocolError(f"attention ranks disagree: ops {sorted(ops)}, layers {sorted(layers)}")
        return Op(ops.pop()), layers.pop(), [row[2:] for row in got]

    def _serve_layer(self, layer: int, counts: list[list[int]]) -> None:
        """`counts[a][x]`: rows attention rank a sends for local expert x (from the header, on the host)."""
        recv = [sum(row) for row in counts] + [0] * self.topo.expert_ranks  # rows from each attention rank
        nothing = [0] * self.topo.world
        x = self.plane.rows(self.plane.nothing(), nothing, recv)
        flat = [n for row in counts for n in row]
        local = torch.arange(self.topo.experts_per_rank, device=self.plane.device).repeat(self.topo.attention_ranks)
        local_ids = local.repeat_interleave(torch.tensor(flat, dtype=torch.int64, device=self.plane.device),
                                            output_size=sum(flat))  # [rows received]
        with section("experts"):
            y = self.groups[layer](x, local_ids)
        self.plane.rows(y, recv, nothing)
        per_expert = [sum(col) for col in zip(*counts, strict=True)]
        self.tokens_per_expert[layer] += torch.tensor(per_expert, dtype=torch.int64, device=self.plane.device)
