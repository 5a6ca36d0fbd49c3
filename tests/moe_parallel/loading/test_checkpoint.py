"""Loading a checkpoint: each worker reads only its own tensors; bad checkpoints are refused clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_parallel.loading.checkpoint import Checkpoint
from moe_parallel.loading.loader import build_single, load_dense, load_experts
from moe_parallel.loading.tiny import write_checkpoint
from moe_parallel.model.config import CheckpointError, ModelConfig
from moe_parallel.model.names import dense_shapes, expert_name
from moe_parallel.parallel.dispatch import Topology
from moe_parallel.parallel.workers import InstanceSpec


@pytest.fixture()
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "m")


def test_expert_rank_reads_only_its_own_experts(ckpt):
    c = ModelConfig.from_dir(ckpt)
    topo = Topology(attention_ranks=1, expert_ranks=2, num_experts=c.num_experts)
    checkpoint = Checkpoint(ckpt)
    groups = load_experts(checkpoint, c, torch.float32, torch.device("cpu"), topo.experts_of(1))
    expected = {expert_name(layer, e, w)
                for layer in range(c.num_layers) for e in range(4, 8) for w in ("w1", "w2", "w3")}
    assert sorted(checkpoint.reads) == sorted(expected)  # each once, none of experts 0-3, no dense tensor
    assert [g.first_expert for g in groups] == [4] * c.num_layers


def test_attention_rank_reads_no_expert(ckpt):
    c = ModelConfig.from_dir(ckpt)
    checkpoint = Checkpoint(ckpt)
    load_dense(checkpoint, c, torch.float32, torch.device("cpu"))
    assert sorted(checkpoint.reads) == sorted(dense_shapes(c))


def _rewrite(ckpt, edit):
    weights = load_file(ckpt / "model.safetensors")
    edit(weights)
    save_file(weights, ckpt / "model.safetensors")


def test_missing_tensor_is_named(ckpt):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(ckpt, lambda w: w.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        build_single(ckpt)


def test_misshapen_tensor_is_named_with_both_shapes(ckpt):
    name = expert_name(0, 3, "w2")
    _rewrite(ckpt, lambda w: w.__setitem__(name, torch.zeros(64, 100)))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[64, 100\], expected \[64, 128\]"):
        build_single(ckpt)


def test_unsupported_architecture_is_refused(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unsupported architecture 'LlamaForCausalLM'"):
        build_single(ckpt)


def test_pickle_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle weights \(pytorch_model.bin\).*refused"):
        build_single(ckpt)


def test_missing_config_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        build_single(tmp_path)


def test_expert_groups_must_divide_experts(ckpt):
    with pytest.raises(ValueError, match="expert_groups=3 does not divide the model's 8 experts"):
        InstanceSpec(str(ckpt), "disaggregated", attention_ranks=1, expert_ranks=3)
    with pytest.raises(ValueError, match="expert-parallel size 3 does not divide the model's 8 experts"):
        InstanceSpec(str(ckpt), "colocated", attention_ranks=3)


def test_sharded_index_maps_every_tensor(tmp_path):
    path = write_checkpoint(tmp_path / "s", shards=3)
    assert len(list(path.glob("*.safetensors"))) == 3
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert Checkpoint(path).file_of == index


def test_tiny_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoTokenizer

    from moe_parallel.loading.tiny import main

    assert main([str(tmp_path / "t")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "t")
    text = tok.apply_chat_template([{"role": "user", "content": "héllo"}], tokenize=False)
    assert text == "<s>[INST] héllo [/INST]"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert build_single(tmp_path / "t").model.config.num_experts == 8
    shutil.rmtree(tmp_path / "t")
