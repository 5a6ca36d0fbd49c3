"""Building an engine from a checkpoint directory and a layout, outside Ray Serve."""

from __future__ import annotations

from pathlib import Path

from engine.engine import AsyncEngine, EngineConfig
from engine.executor import Executor, InProcessExecutor
from moe_parallel.loading.loader import build_single
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.quant import NO_QUANT, QuantConfig
from moe_parallel.step.cache_size import CacheSpec


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def make_engine(executor: Executor, path: str | Path, config: EngineConfig | None = None) -> AsyncEngine:
    c = ModelConfig.from_dir(path)
    config = config or EngineConfig(max_model_len=c.max_position_embeddings)
    if config.max_model_len > c.max_position_embeddings:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                         f"max_position_embeddings={c.max_position_embeddings}")
    return AsyncEngine(executor, load_tokenizer(path), c.vocab_size, c.eos_token_ids, config)


def single_engine(path: str | Path, dtype: str = "auto", cache: CacheSpec | None = None,
                  config: EngineConfig | None = None, device: str = "cpu",
                  quant: QuantConfig = NO_QUANT, quantize_dense: bool = False,
                  lora: tuple[int, int] | None = None, enforce_eager: bool = False) -> AsyncEngine:
    max_len = config.max_model_len if config else None
    runner = build_single(path, dtype, cache or CacheSpec(), device=device, max_model_len=max_len,
                          quant=quant, quantize_dense=quantize_dense, lora=lora, enforce_eager=enforce_eager)
    return make_engine(InProcessExecutor(runner), path, config)
