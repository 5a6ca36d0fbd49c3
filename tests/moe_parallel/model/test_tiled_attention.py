"""Long contexts are attended tile by tile (online softmax over K/V read `TILE_TOKENS`
positions at a time). With the tile forced down to 8 tokens, short test contexts take that path:
parity with transformers in every layout, with a sliding window, GQA ratios 1, 4 and 8, and
chunked prefill through the engine; and the transient memory of one layer at a long context,
measured, stays bounded by the tile, where the whole-context gather does not."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bench.greedy import greedy
from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.loading.tiny import tiny_config, write_checkpoint
from moe_parallel.model import attention
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from moe_parallel.step import metadata
from tests.moe_parallel.cases import PROMPTS, STEPS, check_parity, make
from tests.reference import reference_greedy

TILE = 8
GQA = {1: dict(num_attention_heads=4, num_key_value_heads=4), 4: dict(num_attention_heads=8, num_key_value_heads=2),
       8: dict(num_attention_heads=8, num_key_value_heads=1)}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(attention, "TILE_TOKENS", TILE)
    monkeypatch.setenv("MOE_SERVE_ATTENTION_TILE", str(TILE))  # for worker processes


def gqa_checkpoint(root, ratio: int):
    path = root / f"gqa{ratio}"
    if not (path / "config.json").exists():
        write_checkpoint(path, tiny_config(head_dim=16, sliding_window=12 if ratio == 4 else None, **GQA[ratio]),
                         seed=ratio)
    return path


@pytest.mark.parametrize("variant", ["mixtral", "sliding_window", "e6_k3"])
def test_single_tiled_matches_transformers(tmp_path_factory, small_tiles, variant):
    path = make(tmp_path_factory.getbasetemp(), variant)
    runner = build_single(path)
    check_parity(path, greedy(lambda batches: [runner.step(b) for b in batches], PROMPTS, STEPS))


@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_gqa_ratios_tiled_match_transformers(tmp_path_factory, small_tiles, ratio):
    path = gqa_checkpoint(tmp_path_factory.getbasetemp(), ratio)
    runner = build_single(path)
    check_parity(path, greedy(lambda batches: [runner.step(b) for b in batches], PROMPTS, STEPS))


@pytest.mark.parametrize(("layout", "a", "n"), [("disaggregated", 2, 3), ("colocated", 2, 0)])
def test_multi_process_layouts_tiled_match_transformers(tmp_path_factory, small_tiles, layout, a, n):
    path = make(tmp_path_factory.getbasetemp(), "mixed")  # windowed, 6 experts top-3
    with LocalInstance(InstanceSpec(str(path), layout, a, n, comm_timeout_s=30)) as inst:
        result = greedy(inst.step, PROMPTS, STEPS, ranks=a)
    check_parity(path, result)


def test_chunked_prefill_tiled_matches_transformers(tmp_path_factory, small_tiles):
    path = make(tmp_path_factory.getbasetemp(), "sliding_window")
    runner = build_single(path, max_model_len=128)
    engine = make_engine(InProcessExecutor(runner), path, EngineConfig(max_model_len=128, max_num_batched_tokens=8))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def run(i, prompt):
        return [t async for o in engine.generate(f"r{i}", prompt, params) for t in o.token_ids]

    async def run_all():
        return await asyncio.gather(*[run(i, p) for i, p in enumerate(PROMPTS)])

    assert asyncio.run(run_all()) == [reference_greedy(str(path), p, 12) for p in PROMPTS]


def _largest_allocation(tile: int, monkeypatch) -> tuple[int, torch.Tensor]:
    """The largest single CPU allocation while one layer attends: 2 sequences decoding at a
    16,384-token context (G 2 KV heads of 64), measured with the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from moe_parallel.contract import SeqChunk, StepBatch
    from moe_parallel.model.config import ModelConfig
    from moe_parallel.model.kv_cache import KVCache
    from moe_parallel.model.layers import Rotary

    monkeypatch.setattr(attention, "TILE_TOKENS", tile)
    c = ModelConfig.from_dict(tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=64, hidden_size=64))
    length, bs = 16384, 16
    cache = KVCache(1, 2 * length // bs, bs, 2, 64, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    cache.k.normal_()
    cache.v.normal_()
    layer = attention.Attention(c, 0)
    torch.nn.init.normal_(layer.qkv, std=0.1)
    chunks = tuple(SeqChunk(i, (5,), length - 1, tuple(range(i * length // bs, (i + 1) * length // bs)))
                   for i in range(2))
    meta = metadata.from_batch(StepBatch(chunks), bs, None, Rotary(64, 1e6, torch.device("cpu")),
                               torch.float32, torch.device("cpu"))
    x = torch.randn(2, 64)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = layer(x, meta, cache)
    return max(e.cpu_memory_usage for e in prof.events()), out


def test_transient_memory_is_bounded_by_the_tile(monkeypatch):
    """The torch path's tiles (the native decode kernel, where built, reads the cache in place)."""
    monkeypatch.setattr(attention, "native_attention", lambda q: False)
    tiled, out_tiled = _largest_allocation(1024, monkeypatch)
    whole, out_whole = _largest_allocation(1 << 20, monkeypatch)  # the whole-context gather
    bound = 2 * 1024 * 2 * 64 * 4  # B x tile x G x Dh float32: one tile of K (or V)
    gather = 2 * 16384 * 2 * 64 * 4  # B x L x G x Dh: what one whole-context gather of K takes
    assert tiled <= bound < gather <= whole, (tiled, bound, gather, whole)
    torch.testing.assert_close(out_tiled, out_whole, atol=1e-5, rtol=1e-4)
