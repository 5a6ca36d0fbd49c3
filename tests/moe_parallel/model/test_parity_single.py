"""The `single` layout against transformers' MixtralForCausalLM, in one process."""

from __future__ import annotations

import pytest
import torch

from bench.greedy import greedy
from moe_parallel.loading.loader import build_single
from tests.moe_parallel.cases import PROMPTS, STEPS, check_parity, make
from tests.reference import reference_logits


def run_single(path, dtype=torch.float32, steps=STEPS):
    runner = build_single(path, dtype)
    return greedy(lambda batches: [runner.step(b) for b in batches], PROMPTS, steps)


@pytest.fixture(params=["native", "torch"])
def kernels(request):
    """The experts on the native kernels (where built, as served) and on the torch path they
    fall back to (`MOE_SERVE_KERNELS=torch`)."""
    from moe_parallel import native

    if request.param == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    native.force(request.param if request.param == "torch" else None)
    yield request.param
    native.force(None)


@pytest.mark.parametrize("variant", ["mixtral", "sharded", "sliding_window", "e4_k1", "e6_k3"])
def test_single_matches_transformers(tmp_path_factory, variant, kernels):
    path = make(tmp_path_factory.getbasetemp(), variant)
    runner = build_single(path, max_model_len=256)
    expected = "PackedExperts" if kernels == "native" else "FloatExperts"
    assert type(runner.local_experts().groups[0]).__name__ == expected
    check_parity(path, run_single(path))


def test_sliding_window_is_shorter_than_the_prompts(tmp_path_factory):
    """Guard for the variant above: the window must actually cut into the context."""
    from moe_parallel.model.config import ModelConfig

    window = ModelConfig.from_dir(make(tmp_path_factory.getbasetemp(), "sliding_window")).sliding_window
    assert window is not None and window < max(len(p) for p in PROMPTS)


def test_bfloat16_stays_close_to_float32(tmp_path_factory, kernels):
    """bfloat16 keeps 8 bits of mantissa (relative rounding ~0.2%); with unit-sized activations
    over a few layers that predicts logit errors of about 1% of the logits' spread (std ~1).
    A token whose router margin is below bfloat16's resolution may pick another expert, which
    moves that token's logits by O(1), in transformers too; so the bound is on the mean error
    (0.02) and on the typical position (median of per-position max error below 0.1), not on the
    single worst entry."""
    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    result = run_single(path, torch.bfloat16, steps=4)
    per_position = []
    for prompt, logits in zip(PROMPTS, result.prompt_logits, strict=True):
        ref = reference_logits(str(path), prompt)
        diff = (logits - ref).abs()
        assert diff.mean() < 0.02
        per_position.append(diff.max(dim=-1).values)
    assert torch.cat(per_position).median() < 0.1
    assert all(len(t) == 4 for t in result.tokens)
