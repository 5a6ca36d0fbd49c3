"""The processes of one model instance, whatever starts them (local processes or Ray actors).

`InstanceSpec` describes an instance; rank r of it resolves its device, calls `init_comm`
(joins the `deepspeed.comm` group: NCCL between GPUs, gloo otherwise) and then becomes either
an `AttentionWorker` (steps on request, owns the KV cache) or an expert server (loops on the
data plane until shut down). Global ranks: attention 0..A-1, then experts A..A+N-1; in the
`colocated` layout every rank is an attention worker holding E/ep experts.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed

from moe_parallel.contract import SampleOutput, StepBatch
from moe_parallel.loading.loader import (
    WeightSource,
    load_dense,
    load_experts,
    open_checkpoint,
    parse_dtype,
    resolve_dtype,
)
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.names import expert_shapes
from moe_parallel.model.quant import NO_QUANT, QuantConfig
from moe_parallel.parallel import shm
from moe_parallel.parallel.dispatch import DataPlane, ExpertServer, RemoteExperts, Topology, make_plane
from moe_parallel.runtime import compute
from moe_parallel.runtime.devices import comm_backend, enter_thread, resolve_device
from moe_parallel.step.cache_size import CacheSpec
from moe_parallel.step.runner import ModelRunner

SHM_ALL_REDUCE_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.ShareMemCommBuilder.NAME


@dataclass(frozen=True)
class InstanceSpec:
    checkpoint: str
    layout: str = "disaggregated"  # or "colocated"
    attention_ranks: int = 1  # colocated: the expert-parallel size ep
    expert_ranks: int = 2  # colocated: unused
    dtype: str = "auto"  # or float32 / bfloat16 / float16; auto: the checkpoint's (`loader.resolve_dtype`)
    cache: CacheSpec = field(default_factory=CacheSpec)
    comm_timeout_s: float = 60.0
    device: str = "auto"  # per rank: "auto", "cpu", "gpu" (its own GPU), or a torch device such as "cuda:0"
    backend: str | None = None  # None: NCCL on GPUs, gloo on CPUs; "gloo" also moves CUDA tensors
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    quant: QuantConfig = field(default_factory=QuantConfig)  # the experts' weight-only quantization
    quantize_dense: bool = False  # the attention projections and lm_head too
    max_loras: int = 0  # LoRA adapters resident at once per attention rank (0: no LoRA)
    max_lora_rank: int = 16
    # disaggregated: how attention and expert ranks exchange rows. auto: shared memory where every
    # rank is on the CPU of one host, else the group's collectives (NCCL / gloo); gloo | shm force one
    exchange: str = "auto"
    # per rank pair and direction; a larger message goes through in pieces. 2 MiB: larger rings
    # do not pay (bench.exchange --ring-kib), and A=2, N=4 fits a container's 64 MiB /dev/shm
    shm_ring_kib: int = 2048

    def __post_init__(self):
        if self.layout not in ("disaggregated", "colocated"):
            raise ValueError(f"layout {self.layout!r} is not 'disaggregated' or 'colocated'")
        if self.exchange not in shm.EXCHANGES:
            raise ValueError(f"exchange {self.exchange!r} is not one of {', '.join(shm.EXCHANGES)}")
        if self.shm_ring_kib < 4:
            raise ValueError(f"shm_ring_kib must be at least 4, got {self.shm_ring_kib}")
        if self.dtype != "auto":
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

    def context_len(self, c: ModelConfig) -> int:
        return self.max_model_len or c.max_position_embeddings


_segment: shm.Segment | None = None  # this process's rank in a shm-exchange instance (one rank per process)
_backend = "gloo"


def init_comm(spec: InstanceSpec, rank: int, addr: str, port: int) -> torch.device:
    """Resolve this rank's device, join the instance's group and, for a disaggregated instance,
    agree on its exchange (`shm.setup`); returns the device."""
    global _segment, _backend
    import deepspeed

    enter_thread()
    device = resolve_device(spec.device)
    backend = spec.backend or comm_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's own streams and handles; tensors still name their device
    if backend == "nccl":
        # a collective that cannot finish within comm_timeout_s is caught by NCCL's watchdog, which
        # aborts the communicator and ends the process (Ray then sees the actor die, and the
        # replica is replaced). Not TORCH_NCCL_BLOCKING_WAIT: it turns every wait() into a
        # sleep-poll of the host, three per layer on each side.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # DeepSpeed's CPU backend builds its shared-memory all-reduce op (for tensor-parallel
    # inference) when the group starts: JIT-compiled C++ on the first start of every fresh
    # install, with a compiler needed at run time. Nothing here all-reduces through it (the
    # exchanges are all-to-alls; same-host ones go through this project's own shm plane), so
    # the op is marked unavailable and DeepSpeed takes torch.distributed's path, as it does
    # wherever the op cannot be built. The table is seeded, not read: reading it first probes
    # every op DeepSpeed has (compiler runs among them: 0.2-0.3 s of every rank's start), and
    # DeepSpeed reads it with .get(name, False).
    vars(deepspeed.ops).setdefault("__compatible_ops__", {})[SHM_ALL_REDUCE_OP] = False
    deepspeed.init_distributed(dist_backend=backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                               world_size=spec.world, timeout=timedelta(seconds=spec.comm_timeout_s),
                               auto_mpi_discovery=False, verbose=False)
    _backend, _segment = backend, None
    if spec.layout == "disaggregated":
        if backend != "gloo":
            if spec.exchange == "shm":
                raise ValueError(f"exchange: shm needs CPU ranks on gloo, this instance runs {backend}")
        else:
            eligible = "its device is " + device.type if device.type != "cpu" else shm.available()
            _segment = shm.setup(spec.exchange, rank, spec.attention_ranks, spec.expert_ranks, eligible,
                                 spec.shm_ring_kib << 10)
    return device


def exchange_kind() -> str:
    """What this rank's data plane runs on: 'shm', 'gloo' or 'nccl'."""
    return "shm" if _segment is not None else _backend


def close_comm() -> None:
    """Leave the communication group (local; does not wait for the peers)."""
    global _segment
    if _segment is not None:
        _segment.close()  # peers waiting on this rank see it left
        _segment = None
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # already broken by a lost peer: nothing left to release cleanly
            pass


def rank_dtype(spec: InstanceSpec, device: torch.device) -> torch.dtype:
    return resolve_dtype(spec.dtype, spec.checkpoint, device.type)


class AttentionWorker:
    """Loads the dense part at construction; `allocate_cache` comes second, once the expert
    ranks serve, because sizing the pool runs a dummy step through them. Every use of the data
    plane (a step, a heartbeat, the shutdown header) holds `plane_lock`: Ray may run two of this
    rank's methods at once, and interleaved headers would desynchronise the collectives."""

    def __init__(self, spec: InstanceSpec, rank: int, device: torch.device):
        enter_thread()
        self.spec, self.rank, self.device = spec, rank, device
        self.plane_lock = threading.Lock()
        c, dtype = ModelConfig.from_dir(spec.checkpoint), rank_dtype(spec, device)
        ckpt = open_checkpoint(spec.checkpoint)
        model = load_dense(ckpt, c, dtype, device, spec.quant if spec.quantize_dense else NO_QUANT)
        self.remote: RemoteExperts | None = None
        compute.set_burst(0)  # a process's earlier instance may have set it
        if spec.layout == "disaggregated":
            plane = _plane(spec, c, dtype, device, rank)
            self.remote = RemoteExperts(plane)
            if plane.kind == "shm":  # the ranks share this host's cores: after the last layer, all are ours
                compute.set_burst(plane.cores // spec.attention_ranks)
            self.runner = ModelRunner(model, None, self.remote, after_step=self.remote.step_done, in_group=True,
                                      device=device, tokenizer_dir=spec.checkpoint)
        else:
            _colocate(model, ckpt, c, dtype, device, ep=spec.attention_ranks, rank=rank, quant=spec.quant)
            self.runner = ModelRunner(model, None, None, in_group=True, device=device, tokenizer_dir=spec.checkpoint)
        self.tensors_read = len(ckpt.reads)
        if spec.max_loras:
            self.runner.enable_lora(spec.max_loras, spec.max_lora_rank)
        self.context_len = spec.context_len(c)
        self.kv_blocks: int | None = None

    def allocate_cache(self) -> int:
        """Size (by a dummy step through the experts, where the size is measured) and allocate
        the KV pool; every attention rank of the instance calls it at the same time."""
        with self.plane_lock:
            self.kv_blocks = self.runner.allocate_cache(self.spec.cache, self.context_len)
        return self.kv_blocks

    def info(self) -> dict:
        """What the driver needs to know about this rank once it is up."""
        return {"tensors_read": self.tensors_read, "kv_blocks": self.kv_blocks, "device": str(self.device),
                "exchange": exchange_kind(), "threads": torch.get_num_threads(),
                "burst_threads": max(compute.burst_threads(), torch.get_num_threads())}

    def step(self, batch: StepBatch) -> torch.Tensor:
        with self.plane_lock:
            return self.runner.step(batch).cpu()

    def execute(self, batch: StepBatch) -> list[SampleOutput]:
        with self.plane_lock:
            return self.runner.execute(batch)

    def profile(self, enable: bool | None = None) -> dict[str, tuple[float, int]]:
        """This process's step sections so far; then profiling on (reset) or off."""
        from moe_parallel.runtime import profile

        return profile.swap(enable)

    def expert_token_counts(self) -> list[list[int]]:
        with self.plane_lock:  # between steps: a device read mid-step would stall it (or break a capture)
            return self.runner.expert_token_counts()

    def heartbeat(self) -> None:
        """Tell idle expert ranks the driver is alive (disaggregated; colocated ranks never wait idle)."""
        enter_thread()
        with self.plane_lock:
            if self.remote is not None:
                self.remote.heartbeat()

    def shutdown(self) -> None:
        """After the step in flight, if any: SHUTDOWN is the next header the expert ranks see."""
        enter_thread()
        with self.plane_lock:
            if self.remote is not None:
                self.remote.shutdown()


def build_expert_server(spec: InstanceSpec, rank: int, device: torch.device) -> ExpertServer:
    enter_thread()
    c, ckpt, dtype = ModelConfig.from_dir(spec.checkpoint), open_checkpoint(spec.checkpoint), rank_dtype(spec, device)
    plane = _plane(spec, c, dtype, device, rank)
    groups = load_experts(ckpt, c, dtype, device, plane.topo.experts_of(rank - spec.attention_ranks), spec.quant)
    return ExpertServer(plane, groups, tensors_read=len(ckpt.reads))


def host_cores(world: int, threads: int) -> int:
    """The cores an instance's ranks on one host have between them: their threads added up (every
    rank counted with this rank's `threads`, as Ray's rank actors and `rank_threads` give them),
    at most the CPUs this process may run on."""
    return max(1, min(len(os.sched_getaffinity(0)), world * threads))


def _plane(spec: InstanceSpec, c: ModelConfig, dtype: torch.dtype, device: torch.device, rank: int) -> DataPlane:
    cores = host_cores(spec.world, torch.get_num_threads()) if _segment is not None else 0
    return make_plane(Topology(spec.attention_ranks, spec.expert_ranks, c.num_experts), c.hidden_size, dtype, device,
                      _segment, rank, spec.comm_timeout_s, _backend, cores=cores)


def _colocate(model, ckpt: WeightSource, c: ModelConfig, dtype: torch.dtype, device: torch.device, ep: int,
              rank: int, quant: QuantConfig) -> None:
    from moe_parallel.parallel.colocated import DeepSpeedMoEBlock

    per_rank = c.num_experts // ep
    experts = range(rank * per_rank, (rank + 1) * per_rank)
    with ckpt.track(f"experts {experts.start}-{experts.stop - 1}", expert_shapes(c, experts)):
        for i, layer in enumerate(model.model.layers):
            block = DeepSpeedMoEBlock(c, ep, dtype, device, quant)
            ckpt.load_into(block.destinations(i, experts))
            block.load_gate(layer.block_sparse_moe.gate.weight)
            layer.block_sparse_moe = block
