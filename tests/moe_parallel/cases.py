"""Checkpoints and prompts shared by the parity tests."""

from __future__ import annotations

from pathlib import Path

from moe_parallel.loading.tiny import tiny_config, write_checkpoint
from tests.reference import reference_greedy, reference_logits

STEPS = 32
PROMPTS = [
    [1, 5, 9, 33, 70],
    [1, *range(10, 40)],
    [1, 100, 200, 50, 20, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
    [1, 42],
]

VARIANTS = {
    "mixtral": dict(config=tiny_config(), shards=1),
    "sharded": dict(config=tiny_config(), shards=3),
    "sliding_window": dict(config=tiny_config(sliding_window=8), shards=1),
    "e4_k1": dict(config=tiny_config(num_local_experts=4, num_experts_per_tok=1), shards=1),
    "e6_k3": dict(config=tiny_config(num_local_experts=6, num_experts_per_tok=3, num_hidden_layers=3), shards=1),
    # everything at once, for the multi-process layouts: sharded, windowed, 6 experts top-3
    "mixed": dict(config=tiny_config(num_local_experts=6, num_experts_per_tok=3, sliding_window=8), shards=2),
}


def make(root: Path, name: str) -> Path:
    v = VARIANTS[name]
    path = root / name
    if not (path / "config.json").exists():
        write_checkpoint(path, v["config"], seed=sum(map(ord, name)), shards=v["shards"])
    return path


def check_parity(path: Path, result, atol: float = 1e-4) -> None:
    """Prefill logits within `atol` (max abs) and identical greedy tokens, prompt by prompt."""
    for prompt, logits, tokens in zip(PROMPTS, result.prompt_logits, result.tokens, strict=True):
        ref = reference_logits(str(path), prompt)
        assert logits.shape == ref.shape
        err = (logits - ref).abs().max().item()
        assert err <= atol, f"prompt of {len(prompt)} tokens: prefill logits differ by {err:.2e}"
        assert tokens == reference_greedy(str(path), prompt, STEPS), f"prompt of {len(prompt)} tokens"
    assert len({len(t) for t in result.tokens}) == 1 and len(result.tokens[0]) == STEPS


