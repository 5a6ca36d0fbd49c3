"""The processes of one model instance, whatever starts them (local processes or Ray actors).

`InstanceSpec` describes an instance; rank r of it calls `init_comm` (joins the
`deepspeed.comm` group: gloo on CPU, NCCL on CUDA) and then becomes either an
`AttentionWorker` (steps on request, owns KV cache) or an expert server (loops on the data
plane until shut down). Global ranks: attention 0..A-1, then experts A..A+N-1; in the
`colocated` layout every rank is an attention worker holding E/ep experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed

from moe_parallel.batch import StepBatch
from moe_parallel.checkpoint import Checkpoint
from moe_parallel.config import ModelConfig
from moe_parallel.dispatch import DataPlane, ExpertServer, RemoteExperts, Topology
from moe_parallel.layouts import CacheSpec, attach_experts, load_dense, load_experts, parse_dtype
from moe_parallel.runner import ModelRunner
from moe_parallel.sampler import SampleOutput


@dataclass(frozen=True)
class InstanceSpec:
    checkpoint: str
    layout: str = "disaggregated"  # or "colocated"
    attention_ranks: int = 1  # colocated: the expert-parallel size ep
    expert_ranks: int = 2  # colocated: unused
    dtype: str = "float32"
    cache: CacheSpec = field(default_factory=CacheSpec)
    comm_timeout_s: float = 60.0
    idle_timeout_s: float = 7 * 24 * 3600.0

    def __post_init__(self):
        if self.layout not in ("disaggregated", "colocated"):
            raise ValueError(f"layout {self.layout!r} is not 'disaggregated' or 'colocated'")
        parse_dtype(self.dtype)
        c = ModelConfig.from_dir(self.checkpoint)
        if self.layout == "disaggregated":
            Topology(self.attention_ranks, self.expert_ranks, c.num_experts)
        elif c.num_experts % self.attention_ranks:
            raise ValueError(f"expert-parallel size {self.attention_ranks} does not divide the model's "
                             f"{c.num_experts} experts per layer")

    @property
    def world(self) -> int:
        return self.attention_ranks + (self.expert_ranks if self.layout == "disaggregated" else 0)

    def is_attention(self, rank: int) -> bool:
        return rank < self.attention_ranks


def init_comm(spec: InstanceSpec, rank: int, addr: str, port: int) -> None:
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(torch.cuda.current_device())
        torch.set_default_device("cuda")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               init_method=f"tcp://{addr}:{port}", rank=rank, world_size=spec.world,
                               timeout=timedelta(seconds=spec.comm_timeout_s), auto_mpi_discovery=False,
                               verbose=False)


def close_comm() -> None:
    """Leave the communication group (local; does not wait for the peers)."""
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # already broken by a lost peer: nothing left to release cleanly
            pass


class AttentionWorker:
    def __init__(self, spec: InstanceSpec, rank: int):
        self.spec, self.rank = spec, rank
        c, ckpt, dtype = ModelConfig.from_dir(spec.checkpoint), Checkpoint(spec.checkpoint), parse_dtype(spec.dtype)
        model = load_dense(ckpt, c, dtype)
        self.remote: RemoteExperts | None = None
        if spec.layout == "disaggregated":
            self.remote = RemoteExperts(_plane(spec, c, dtype))
            attach_experts(model, self.remote)
            self.runner = ModelRunner(model, spec.cache.new(c, dtype), after_step=self.remote.step_done,
                                      in_group=True)
        else:
            _colocate(model, ckpt, c, dtype, ep=spec.attention_ranks, rank=rank)
            self.runner = ModelRunner(model, spec.cache.new(c, dtype), in_group=True)
        self.tensors_read = len(ckpt.reads)

    def step(self, batch: StepBatch) -> torch.Tensor:
        return self.runner.step(batch)

    def execute(self, batch: StepBatch) -> list[SampleOutput]:
        return self.runner.execute(batch)

    def shutdown(self) -> None:
        if self.remote is not None:
            self.remote.shutdown()


def build_expert_server(spec: InstanceSpec, rank: int) -> ExpertServer:
    c, ckpt, dtype = ModelConfig.from_dir(spec.checkpoint), Checkpoint(spec.checkpoint), parse_dtype(spec.dtype)
    plane = _plane(spec, c, dtype)
    groups = load_experts(ckpt, c, dtype, plane.topo.experts_of(rank - spec.attention_ranks))
    return ExpertServer(plane, groups, tensors_read=len(ckpt.reads))


def _plane(spec: InstanceSpec, c: ModelConfig, dtype: torch.dtype) -> DataPlane:
    topo = Topology(spec.attention_ranks, spec.expert_ranks, c.num_experts)
    return DataPlane(topo, c.hidden_size, dtype, timedelta(seconds=spec.idle_timeout_s))


def _colocate(model, ckpt: Checkpoint, c: ModelConfig, dtype: torch.dtype, ep: int, rank: int) -> None:
    from moe_parallel.colocated import DeepSpeedMoEBlock

    per_rank = c.num_experts // ep
    groups = load_experts(ckpt, c, dtype, range(rank * per_rank, (rank + 1) * per_rank))
    for layer, group in zip(model.model.layers, groups, strict=True):
        layer.block_sparse_moe = DeepSpeedMoEBlock(c, ep, layer.block_sparse_moe.gate.weight, group)
