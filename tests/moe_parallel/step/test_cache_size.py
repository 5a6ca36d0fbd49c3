"""The KV pool is sized from memory unless given, and a pool too small for one sequence is refused."""

from __future__ import annotations

import asyncio

import pytest

from moe_parallel.loading.loader import build_single
from moe_parallel.loading.tiny import tiny_config, write_checkpoint
from moe_parallel.step.cache_size import GIB, CacheSpec, CacheTooSmall


def test_pool_is_sized_from_a_memory_budget(tiny_ckpt):
    # tiny model: 2 layers x (K and V) x 2 KV heads x 16 dims x 4 bytes = 512 bytes per token
    runner = build_single(tiny_ckpt, cache=CacheSpec(memory_gib=0.01, block_size=16), max_model_len=256)
    assert runner.cache.num_blocks == int(0.01 * GIB) // (512 * 16) == 1310
    assert runner.cache.k.shape == (2, 1310 * 16 + 1, 2, 16)  # + the scratch slot


def test_default_cpu_pool_is_one_gib(tiny_ckpt):
    runner = build_single(tiny_ckpt, max_model_len=256)
    assert runner.cache.num_blocks == GIB // (512 * 16)


def test_a_pool_too_small_for_one_sequence_is_refused_with_both_numbers(tiny_ckpt):
    with pytest.raises(CacheTooSmall, match=r"holds 64 tokens .*\(4 blocks of 16\).*max_model_len=256"):
        build_single(tiny_ckpt, cache=CacheSpec(num_blocks=4), max_model_len=256)


def test_app_args_refuse_the_same_before_anything_starts(tiny_ckpt):
    from deployments.config import parse_args

    base = {"model": str(tiny_ckpt), "accelerator": "cpu", "max_model_len": 2048}
    with pytest.raises(ValueError, match=r"holds 1024 tokens .*max_model_len=2048"):
        parse_args(base | {"kv_cache_blocks": 64})
    with pytest.raises(ValueError, match=r"holds 1024 tokens .*max_model_len=2048"):
        parse_args(base | {"kv_cache_memory_gib": 512 * 1024 / GIB})
    assert parse_args(base | {"kv_cache_blocks": 128}).kv_cache_blocks == 128


def test_readme_gpu_example_shape_serves_a_chat_without_max_tokens(tmp_path):
    """max_model_len 32768 and no kv_cache_blocks, as the README's GPU example: the pool is sized
    from memory, so a chat request without max_tokens (budget: the whole context) is served."""
    from engine.engine import EngineConfig
    from engine.executor import InProcessExecutor
    from engine.factory import load_tokenizer, make_engine
    from moe_parallel.contract import SamplingParams

    path = write_checkpoint(tmp_path / "long", tiny_config(max_position_embeddings=32768))
    engine = make_engine(InProcessExecutor(build_single(path, max_model_len=32768)), path,
                         EngineConfig(max_model_len=32768))
    tok = load_tokenizer(path)
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False).input_ids

    async def first_tokens() -> list[int]:
        got = []
        stream = engine.generate("chat", prompt, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
        async for out in stream:
            got += out.token_ids
            if len(got) >= 5:
                break
        await stream.aclose()
        return got

    assert len(asyncio.run(first_tokens())) == 5
    assert engine.scheduler.blocks[0].num_free == engine.scheduler.config.num_blocks  # the abort freed it


def test_the_dummy_step_that_measures_a_gpu_runs_at_the_batch_token_budget(tiny_ckpt):
    """On a GPU the peak of this step sets the KV budget; here it must at least run at full size
    and leave no scratch cache behind (the CUDA peak reading itself needs a GPU)."""
    runner = build_single(tiny_ckpt, cache=CacheSpec(num_blocks=8), max_model_len=128)
    runner.dummy_step(CacheSpec(max_num_batched_tokens=200, block_size=16))
    assert runner.cache is None
