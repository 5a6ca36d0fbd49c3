"""LoRA adapters through the engine: the same tokens as transformers + PEFT (adapter applied, not
merged) for each adapter, alone and in a batch that mixes adapters and the base model, in the
`single` and `disaggregated` layouts; adapters that cannot be served are refused with the reason."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.engine import EngineConfig
from engine.executor import InProcessExecutor, LocalProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.lora import LoraError, read_adapter
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from tests.lora_adapters import peft_greedy, write_adapter
from tests.reference import reference_greedy

PROMPTS = [[1, 5, 9, 33, 70], [1, *range(10, 30)], [1, 42, 43]]
STEPS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": write_adapter(tiny_ckpt, root / "alpha", seed=1, rank=4),
            "beta": write_adapter(tiny_ckpt, root / "beta", seed=2, rank=8, targets=["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def expected(tiny_ckpt, adapters) -> dict[str | None, list[list[int]]]:
    out = {name: [peft_greedy(tiny_ckpt, path, p, STEPS) for p in PROMPTS] for name, path in adapters.items()}
    out[None] = [reference_greedy(str(tiny_ckpt), p, STEPS) for p in PROMPTS]
    assert out["alpha"] != out[None] and out["beta"] != out[None] and out["alpha"] != out["beta"]  # they bite
    return out


async def _run(engine, jobs: list[tuple[str, list[int], tuple[str, str] | None]]) -> list[list[int]]:
    async def one(rid, prompt, lora):
        tokens = []
        async for o in engine.generate(rid, prompt, GREEDY, lora):
            tokens += o.token_ids
        return tokens

    return await asyncio.gather(*[one(*job) for job in jobs])


def _mixed_jobs(adapters) -> list[tuple[str, list[int], tuple[str, str] | None]]:
    jobs = []
    for name in ("alpha", "beta", None):
        lora = None if name is None else (name, str(adapters[name]))
        jobs += [(f"{name}-{i}", p, lora) for i, p in enumerate(PROMPTS)]
    return jobs


def _check(results, expected) -> None:
    by_adapter = [results[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i in range(3)]
    assert by_adapter == [expected["alpha"], expected["beta"], expected[None]]


def test_single_mixed_batch_matches_peft(tiny_ckpt, adapters, expected):
    runner = build_single(tiny_ckpt, max_model_len=256, lora=(4, 8))
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=256, max_loras=4))
    _check(asyncio.run(_run(engine, _mixed_jobs(adapters))), expected)
    assert runner.lora.loads == 2  # each adapter loaded once, then served from its slot


def test_disaggregated_mixed_batch_matches_peft(tiny_ckpt, adapters, expected):
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", 2, 2, max_model_len=256, max_loras=2, max_lora_rank=8,
                        comm_timeout_s=30)
    with LocalInstance(spec) as inst:
        engine = make_engine(LocalProcessExecutor(inst), tiny_ckpt, EngineConfig(max_model_len=256, max_loras=2))
        _check(asyncio.run(_run(engine, _mixed_jobs(adapters))), expected)


def test_more_adapters_than_slots_take_turns(tiny_ckpt, adapters, expected, tmp_path):
    """One slot, two adapters in flight: the scheduler never puts both in one step, and slots
    are refilled as the adapters alternate; tokens are unchanged."""
    runner = build_single(tiny_ckpt, max_model_len=256, lora=(1, 8))
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=256, max_loras=1))
    _check(asyncio.run(_run(engine, _mixed_jobs(adapters))), expected)


def test_unloading_waits_for_running_sequences_and_then_frees_the_slot(tiny_ckpt, adapters, expected):
    async def main():
        runner = build_single(tiny_ckpt, max_model_len=256, lora=(2, 8))
        engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=256, max_loras=2))
        lora = ("alpha", str(adapters["alpha"]))
        task = asyncio.create_task(_run(engine, [("a", PROMPTS[0], lora)]))
        while not runner.lora.slot_of:
            await asyncio.sleep(0.001)
        engine.unload_lora("alpha")  # while its sequence runs
        tokens = (await task)[0]
        await _run(engine, [("b", PROMPTS[1], None)])  # a later step carries the release to the rank
        return tokens, dict(runner.lora.slot_of)

    tokens, resident = asyncio.run(main())
    assert tokens == expected["alpha"][0] and resident == {}


def test_adapters_that_cannot_be_served_are_refused_with_the_reason(tiny_ckpt, adapters, tmp_path):
    c = ModelConfig.from_dir(tiny_ckpt)

    def variant(name, edit_config=None, extra_tensors=None):
        path = tmp_path / name
        shutil.copytree(adapters["alpha"], path)
        if edit_config:
            cfg = json.loads((path / "adapter_config.json").read_text())
            edit_config(cfg)
            (path / "adapter_config.json").write_text(json.dumps(cfg))
        if extra_tensors:
            tensors = load_file(path / "adapter_model.safetensors") | extra_tensors
            save_file(tensors, path / "adapter_model.safetensors")
        return path

    import torch

    expert = variant("expert", extra_tensors={
        "base_model.model.model.layers.0.block_sparse_moe.experts.3.w1.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(LoraError, match=r"targets 'model\.layers\.0\.block_sparse_moe\.experts\.3\.w1', which is "
                                        r"not an attention projection; .*experts.*shared by every adapter"):
        read_adapter(expert, c, 16)
    target = variant("target", edit_config=lambda cfg: cfg.update(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(LoraError, match="target module 'lm_head' is not an attention projection"):
        read_adapter(target, c, 16)
    saved = variant("saved", edit_config=lambda cfg: cfg.update(modules_to_save=["embed_tokens"]))
    with pytest.raises(LoraError, match=r"modules_to_save \['embed_tokens'\] is not supported"):
        read_adapter(saved, c, 16)
    with pytest.raises(LoraError, match="adapter rank 8 exceeds max_lora_rank=4"):
        read_adapter(adapters["beta"], c, 4)
    (pickled := variant("pickled")).joinpath("adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(LoraError, match="adapter_model.bin is a pickle file, which is refused"):
        read_adapter(pickled, c, 16)
    with pytest.raises(LoraError, match="not a PEFT adapter directory"):
        read_adapter(tmp_path / "nowhere", c, 16)


def test_an_adapter_missing_on_the_rank_fails_only_its_requests(tiny_ckpt, tmp_path, expected):
    """The directory vanished after registration: its requests fail with the reason; the base
    model's request in the same step runs on."""
    from engine.outputs import SequenceError

    runner = build_single(tiny_ckpt, max_model_len=256, lora=(2, 8))
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=256, max_loras=2))

    async def main():
        jobs = [("gone", PROMPTS[0], ("gone", str(tmp_path / "deleted"))), ("base", PROMPTS[0], None)]
        return await asyncio.gather(*[_run(engine, [job]) for job in jobs], return_exceptions=True)

    gone, base = asyncio.run(main())
    assert isinstance(gone, SequenceError) and "could not be loaded" in str(gone)
    assert base == [expected[None][0]] and engine.dead is None


def test_a_name_loaded_again_from_another_directory_serves_the_new_weights(tiny_ckpt, adapters, expected):
    runner = build_single(tiny_ckpt, max_model_len=256, lora=(2, 8))
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=256, max_loras=2))
    first = asyncio.run(_run(engine, [("1", PROMPTS[0], ("same", str(adapters["alpha"])))]))
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=256, max_loras=2))
    second = asyncio.run(_run(engine, [("2", PROMPTS[0], ("same", str(adapters["beta"])))]))
    assert first == [expected["alpha"][0]] and second == [expected["beta"][0]]


@pytest.mark.parametrize("layout", ["bare", "named"])
def test_both_peft_key_layouts_are_read(tiny_ckpt, adapters, tmp_path, layout):
    """PEFT saves `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`; adapters
    saved from the inner model, or with the adapter name kept, write `model.layers...` or
    `...lora_A.default.weight`. All read to the same weights."""
    source = adapters["alpha"]
    path = tmp_path / layout
    shutil.copytree(source, path)
    tensors = load_file(source / "adapter_model.safetensors")
    if layout == "bare":
        renamed = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    else:
        renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                   for k, v in tensors.items()}
    assert set(renamed) != set(tensors)
    save_file(renamed, path / "adapter_model.safetensors")
    c = ModelConfig.from_dir(tiny_ckpt)
    original, other = read_adapter(source, c, 8), read_adapter(path, c, 8)
    assert original.weights.keys() == other.weights.keys() and len(other.weights) == 4 * c.num_layers
    assert all((a == b).all() for k in original.weights
               for a, b in zip(original.weights[k], other.weights[k], strict=True))
