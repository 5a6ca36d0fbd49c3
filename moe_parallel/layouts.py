"""Building one rank of each layout from a checkpoint directory: what it reads, how it is wired.

| layout          | rank kind  | reads                               | experts backend        |
| --------------- | ---------- | ----------------------------------- | ---------------------- |
| single          | the only   | everything                          | LocalExperts           |
| disaggregated   | attention  | dense tensors                       | RemoteExperts          |
| disaggregated   | expert j   | experts.{E/N*j .. E/N*(j+1)-1} only | (serves the others)    |
| colocated       | rank r     | dense + its E/ep experts            | DeepSpeed MoE (ep)     |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_parallel.checkpoint import Checkpoint
from moe_parallel.config import ModelConfig
from moe_parallel.experts import ExpertGroup
from moe_parallel.kv_cache import KVCache
from moe_parallel.model import CausalLM
from moe_parallel.moe import ExpertsBackend, LocalExperts
from moe_parallel.runner import ModelRunner
from moe_parallel.weights import dense_shapes, expert_shapes

LAYOUTS = ("single", "disaggregated", "colocated")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class CacheSpec:
    num_blocks: int = 256
    block_size: int = 16

    def new(self, c: ModelConfig, dtype: torch.dtype) -> KVCache:
        return KVCache(c.num_layers, self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim, dtype)


def load_dense(ckpt: Checkpoint, c: ModelConfig, dtype: torch.dtype) -> CausalLM:
    return CausalLM.from_dense_weights(c, ckpt.load(dense_shapes(c), dtype))


def load_experts(ckpt: Checkpoint, c: ModelConfig, dtype: torch.dtype, experts: range) -> list[ExpertGroup]:
    weights = ckpt.load(expert_shapes(c, experts), dtype)
    return [ExpertGroup.from_weights(weights, layer, experts) for layer in range(c.num_layers)]


def attach_experts(model: CausalLM, backend: ExpertsBackend) -> None:
    for layer in model.model.layers:
        layer.block_sparse_moe.experts = backend


def build_single(path: str | Path, dtype: torch.dtype = torch.float32, cache: CacheSpec = CacheSpec()) -> ModelRunner:
    c, ckpt = ModelConfig.from_dir(path), Checkpoint(path)
    model = load_dense(ckpt, c, dtype)
    attach_experts(model, LocalExperts(load_experts(ckpt, c, dtype, range(c.num_experts))))
    return ModelRunner(model, cache.new(c, dtype))
