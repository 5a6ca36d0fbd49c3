"""The placement planner and its command line."""

from __future__ import annotations

import json

import pytest

from cluster.__main__ import main
from cluster.plan import GIB, GpuPool, PlanError, make_plan
from moe_parallel.model.config import ModelConfig

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "hidden_act": "silu",
}


@pytest.fixture()
def mixtral():
    return ModelConfig.from_dict(MIXTRAL_8X7B)


def test_mixtral_on_eight_80gb_gpus_fits(mixtral):
    plan = make_plan(mixtral, "bfloat16", GpuPool(8, 80))
    # 4 experts x 32 layers x 3 x 4096 x 14336 x 2 bytes = 42.0 GiB: two expert ranks of 4 experts each
    assert (plan.attention_ranks, plan.expert_ranks, plan.instances) == (1, 2, 2)
    experts = [r for r in plan.ranks if r.role == "expert"]
    assert [r.experts for r in experts] == [(0, 3), (4, 7)]
    assert experts[0].weight_bytes == 4 * 32 * 3 * 4096 * 14336 * 2
    attention = plan.ranks[0]
    assert round(attention.weight_bytes / GIB, 2) == 2.99  # embeddings, lm_head, attention, gates
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert attention.kv_tokens == attention.kv_bytes // plan.kv_bytes_per_token > 500_000


def test_plan_that_does_not_fit_is_refused_with_the_reason(mixtral):
    with pytest.raises(PlanError, match="one instance needs 1 attention \\+ 8 expert GPUs; there are 2 GPUs"):
        make_plan(mixtral, "bfloat16", GpuPool(2, 24))
    with pytest.raises(PlanError, match="an expert rank holding 8 experts needs 84.0 GiB"):
        make_plan(mixtral, "bfloat16", GpuPool(8, 80), expert_ranks=1)
    with pytest.raises(PlanError, match="3 expert ranks do not divide the model's 8 experts"):
        make_plan(mixtral, "bfloat16", GpuPool(8, 80), expert_ranks=3)
    with pytest.raises(PlanError, match="even one expert per rank \\(21.0 GiB\\) does not fit a 16 GiB GPU"):
        make_plan(mixtral, "float32", GpuPool(64, 16))


def test_two_pools_place_attention_and_experts_apart(mixtral):
    plan = make_plan(mixtral, "bfloat16", GpuPool(2, 80, "attention_gpu"), GpuPool(8, 48, "expert_gpu"),
                     attention_ranks=2)
    assert (plan.attention_ranks, plan.expert_ranks, plan.instances) == (2, 4, 1)
    assert {r.pool for r in plan.ranks if r.role == "attention"} == {"attention_gpu"}
    assert {r.pool for r in plan.ranks if r.role == "expert"} == {"expert_gpu"}
    assert plan.ranks[-1].resources == {"CPU": 1.0, "expert_gpu": 1, "GPU": 1.0}
    assert plan.ranks[0].resources == {"CPU": 1.0, "attention_gpu": 1, "GPU": 1.0}


def test_cli_prints_plan_and_one_line_errors(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MIXTRAL_8X7B))
    assert main(["plan", str(config), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "1 attention + 2 expert ranks per instance; 2 instance(s) fit" in out and "| 1 | expert | gpu | 0-3 |" in out
    assert main(["plan", str(config), "--gpus", "2", "--gpu-memory", "24"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert main(["plan", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_plan_counts_what_the_engine_ranks_hold(tiny_ckpt):
    """Weights per rank as the engine loads them; KV tokens in the engine's whole blocks."""
    import torch

    from moe_parallel import native
    from moe_parallel.loading.checkpoint import Checkpoint
    from moe_parallel.loading.loader import load_dense, load_experts

    c = ModelConfig.from_dir(tiny_ckpt)
    plan = make_plan(c, "float32", GpuPool(3, 1), expert_ranks=2, headroom_gib=0.5, block_size=16)
    cpu = torch.device("cpu")
    native.force("torch")  # the plan is for GPU ranks: plain tensors, as a GPU holds them
    try:
        dense = load_dense(Checkpoint(tiny_ckpt), c, torch.float32, cpu)
        experts = load_experts(Checkpoint(tiny_ckpt), c, torch.float32, cpu, range(4, 8))
    finally:
        native.force(None)
    held = sum(p.numel() * p.element_size() for p in dense.parameters())
    expert_held = sum(g.w13.nbytes + g.w2.nbytes for g in experts)
    attention, expert = plan.ranks[0], plan.ranks[2]
    assert attention.weight_bytes == held
    assert expert.experts == (4, 7) and expert.weight_bytes == expert_held
    usable = int(1 * GIB * 0.9 - 0.5 * GIB) - held
    blocks = usable // (plan.kv_bytes_per_token * 16)
    assert attention.kv_tokens == blocks * 16 and attention.kv_bytes == blocks * 16 * plan.kv_bytes_per_token
