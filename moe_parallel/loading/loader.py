"""Building one rank of each layout from a checkpoint directory: what it reads, how it is wired.

| layout          | rank kind  | reads                               | experts backend        |
| --------------- | ---------- | ----------------------------------- | ---------------------- |
| single          | the only   | everything                          | LocalExperts           |
| disaggregated   | attention  | dense tensors                       | RemoteExperts          |
| disaggregated   | expert j   | experts.{E/N*j .. E/N*(j+1)-1} only | (serves the others)    |
| colocated       | rank r     | dense + its E/ep experts            | DeepSpeed MoE (ep)     |

Every builder takes the worker's device and allocates everything there: parameters first
(uninitialised), then the checkpoint streams into them tensor by tensor (`checkpoint.py`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch

from moe_parallel.loading.checkpoint import Checkpoint
from moe_parallel.model.config import CheckpointError, ModelConfig
from moe_parallel.model.decoder import CausalLM
from moe_parallel.model.dense import pack_dense, packed_dense
from moe_parallel.model.experts import Experts, FloatExperts, QuantExperts
from moe_parallel.model.moe import LocalExperts
from moe_parallel.model.names import dense_shapes, expert_shapes
from moe_parallel.model.packed import PackedExperts, native_experts
from moe_parallel.model.quant import NO_QUANT, QuantConfig
from moe_parallel.runtime import compute
from moe_parallel.runtime.devices import enter_thread, resolve_device
from moe_parallel.step.cache_size import CacheSpec
from moe_parallel.step.runner import ModelRunner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightSource(Protocol):
    reads: list[str]

    def load_into(self, destinations: dict[str, torch.Tensor]) -> None: ...

    def track(self, what: str, names) -> AbstractContextManager: ...


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def checkpoint_dtype(path: str | Path) -> str | None:
    """The dtype the checkpoint's config.json records (`torch_dtype`, or `dtype` as transformers 5
    writes it), if it is one this project computes in."""
    import json

    raw = json.loads((Path(path) / "config.json").read_text())
    stored = raw.get("torch_dtype") or raw.get("dtype")
    return stored if stored in DTYPES else None


def resolve_dtype(name: str, path: str | Path, device_type: str) -> torch.dtype:
    """`name`, or for "auto" the checkpoint's own dtype as vLLM picks it: float16 runs as
    bfloat16 on a CPU (no fast float16 products there); a checkpoint that records none runs
    in bfloat16 on a GPU and float32 on a CPU."""
    if name != "auto":
        return parse_dtype(name)
    stored = checkpoint_dtype(path)
    if stored is None:
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if stored == "float16" and device_type != "cuda":
        return torch.bfloat16
    return DTYPES[stored]


def open_checkpoint(path: str | Path) -> WeightSource:
    """The checkpoint's tensors: plain safetensors, or compressed-tensors with quantized experts."""
    from moe_parallel.loading.compressed import CompressedSource, checkpoint_quant

    quant = checkpoint_quant(path)
    return Checkpoint(path) if quant is None else CompressedSource(Checkpoint(path), quant)


def resolve_quant(path: str | Path, requested: str = "auto", group_size: int = 128) -> QuantConfig:
    """The experts' quantization: the checkpoint's own when it is pre-quantized ("auto" or the
    same scheme), else `requested` applied while loading ("auto" = none)."""
    from moe_parallel.loading.compressed import checkpoint_quant

    stored = checkpoint_quant(path)
    if stored is None:
        return NO_QUANT if requested in ("auto", "none") else QuantConfig(requested, group_size=group_size)
    if requested not in ("auto", stored.scheme):
        raise CheckpointError(f"{path} holds {stored.scheme} experts (compressed-tensors); serve it with "
                              f"quantization 'auto' or '{stored.scheme}', not {requested!r}")
    return stored


def load_dense(source: WeightSource, c: ModelConfig, dtype: torch.dtype, device: torch.device,
               quant: QuantConfig = NO_QUANT) -> CausalLM:
    """The dense part; with `quant`, its attention projections and lm_head quantized as they stream in."""
    model = CausalLM.empty(c, dtype, device, quant)
    destinations = model.destinations()
    if destinations.keys() != dense_shapes(c).keys():  # the model and the weight list must agree
        raise CheckpointError(f"dense weights of the model and of the checkpoint layout differ: "
                              f"{sorted(destinations.keys() ^ dense_shapes(c).keys())[:3]}")
    with source.track("dense weights", destinations):
        source.load_into(destinations)
    if packed_dense(device, dtype):
        pack_dense(model)
    return model


def load_experts(source: WeightSource, c: ModelConfig, dtype: torch.dtype, device: torch.device,
                 experts: range, quant: QuantConfig = NO_QUANT) -> list[Experts | PackedExperts]:
    """A layer at a time: allocate its experts (float, packed for the native kernels where they
    run, or quantized per `quant`), stream them in."""
    groups = []
    packed = native_experts(device, dtype, quant)
    with source.track(f"experts {experts.start}-{experts.stop - 1}", expert_shapes(c, experts)):
        for layer in range(c.num_layers):
            if packed:
                group = PackedExperts(experts, c.hidden_size, c.intermediate_size, dtype, quant)
            elif quant.enabled:
                group = QuantExperts(experts, c.hidden_size, c.intermediate_size, quant, dtype, device)
            else:
                group = FloatExperts.empty(experts, c.hidden_size, c.intermediate_size, dtype, device)
            source.load_into(group.destinations(layer))
            groups.append(group)
    return groups


def build_single(path: str | Path, dtype: torch.dtype | str = torch.float32, cache: CacheSpec | None = None,
                 device: torch.device | str = "cpu", max_model_len: int | None = None,
                 quant: QuantConfig = NO_QUANT, quantize_dense: bool = False,
                 lora: tuple[int, int] | None = None, enforce_eager: bool = False) -> ModelRunner:
    """The whole model in this process on `device` ("cpu", "cuda:0", or "auto"/"gpu") in `dtype`
    (a torch dtype, or a name: "auto" is the checkpoint's, see `resolve_dtype`), its experts
    (and with `quantize_dense` its attention projections and lm_head) quantized per `quant`;
    `lora` = (max_loras, max_lora_rank) makes room for LoRA adapters; decode steps run as CUDA
    graphs where possible (`ModelRunner.graphs_possible`) unless `enforce_eager`. Built on the
    process's compute thread (`compute.py`), where the engine then steps it."""
    return compute.run(_build_single, path, dtype, cache, device, max_model_len, quant, quantize_dense, lora,
                       enforce_eager)


def _build_single(path, dtype, cache, device, max_model_len, quant, quantize_dense, lora,
                  enforce_eager) -> ModelRunner:
    enter_thread()
    device = resolve_device(str(device))
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, path, device.type)
    c, ckpt = ModelConfig.from_dir(path), open_checkpoint(path)
    model = load_dense(ckpt, c, dtype, device, quant if quantize_dense else NO_QUANT)
    experts = LocalExperts(load_experts(ckpt, c, dtype, device, range(c.num_experts), quant))
    runner = ModelRunner(model, None, experts, device=device, tokenizer_dir=str(path), enforce_eager=enforce_eager)
    if lora is not None:
        runner.enable_lora(*lora)
    runner.allocate_cache(cache or CacheSpec(), max_model_len or c.max_position_embeddings)
    return runner
