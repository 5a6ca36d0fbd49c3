"""The benchmark model of the project's performance protocol, written on demand.

bench-214m: Mixtral's shape scaled down - hidden 512, intermediate 1792, 8 layers, 8 experts
top-2, 8 heads / 2 KV heads, vocabulary 32000, random weights (seed 0), float32: about 214M
parameters, about 77M active per token.
"""

from __future__ import annotations

from pathlib import Path

from moe_parallel.loading.tiny import tiny_config, write_checkpoint

BENCH_DIR = Path(__file__).resolve().parent / ".models"

BENCH_214M = tiny_config(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768)


def bench_model(name: str = "bench-214m", raw: dict = BENCH_214M) -> Path:
    path = BENCH_DIR / name
    if not (path / "config.json").exists():
        write_checkpoint(path, raw, seed=0)
    return path

