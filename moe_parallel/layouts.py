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

from pathlib import Path
from typing import Protocol

import torch

from moe_parallel.cache_size import CacheSpec
from moe_parallel.checkpoint import Checkpoint
from moe_parallel.config import CheckpointError, ModelConfig
from moe_parallel.devices import enter_thread, resolve_device
from moe_parallel.experts import ExpertGroup
from moe_parallel.model import CausalLM
from moe_parallel.moe import ExpertsBackend, LocalExperts
from moe_parallel.runner import ModelRunner
from moe_parallel.weights import dense_shapes

LAYOUTS = ("single", "disaggregated", "colocated")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightSource(Protocol):
    reads: list[str]

    def load_into(self, destinations: dict[str, torch.Tensor]) -> None: ...


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_dense(source: WeightSource, c: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    model = CausalLM.empty(c, dtype, device)
    destinations = model.destinations()
    if destinations.keys() != dense_shapes(c).keys():  # the model and the weight list must agree
        raise CheckpointError(f"dense weights of the model and of the checkpoint layout differ: "
                              f"{sorted(destinations.keys() ^ dense_shapes(c).keys())[:3]}")
    source.load_into(destinations)
    return model


def load_experts(source: WeightSource, c: ModelConfig, dtype: torch.dtype, device: torch.device,
                 experts: range) -> list[ExpertGroup]:
    groups = [ExpertGroup.empty(experts, c.hidden_size, c.intermediate_size, dtype, device)
              for _ in range(c.num_layers)]
    for layer, group in enumerate(groups):
        source.load_into(group.destinations(layer))
    return groups


def attach_experts(model: CausalLM, backend: ExpertsBackend) -> None:
    for layer in model.model.layers:
        layer.block_sparse_moe.experts = backend


def build_single(path: str | Path, dtype: torch.dtype = torch.float32, cache: CacheSpec | None = None,
                 device: torch.device | str = "cpu", max_model_len: int | None = None) -> ModelRunner:
    """The whole model in this process on `device` ("cpu", "cuda:0", or "auto"/"gpu")."""
    enter_thread()
    device = resolve_device(str(device))
    c, ckpt = ModelConfig.from_dir(path), Checkpoint(path)
    model = load_dense(ckpt, c, dtype, device)
    attach_experts(model, LocalExperts(load_experts(ckpt, c, dtype, device, range(c.num_experts))))
    runner = ModelRunner(model, None, device=device)
    runner.allocate_cache(cache or CacheSpec(), max_model_len or c.max_position_embeddings)
    return runner
