"""The engine over a multi-process instance with two attention ranks: each sequence stays on
the rank that holds its KV cache, and every rank's pool is returned."""

from __future__ import annotations

import asyncio

from engine.engine import EngineConfig
from engine.executor import LocalProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from moe_parallel.step.cache_size import CacheSpec
from tests.engine.helpers import run_all
from tests.reference import reference_greedy

PROMPTS = [[1, *range(20, 24 + 3 * i)] for i in range(6)]


def test_two_attention_ranks_serve_parity_and_release_blocks(tiny_ckpt):
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=2, expert_ranks=2,
                        cache=CacheSpec(num_blocks=32, block_size=8), max_model_len=128)
    seqs_per_rank: list[set[int]] = [set(), set()]

    class Recording(LocalProcessExecutor):
        async def execute(self, batches):
            for r, b in enumerate(batches):
                seqs_per_rank[r] |= {c.seq_id for c in b.chunks}
            return await super().execute(batches)

    with LocalInstance(spec) as inst:
        engine = make_engine(Recording(inst), tiny_ckpt, EngineConfig(max_model_len=128, max_num_batched_tokens=32))
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        results = asyncio.run(run_all(engine, PROMPTS, params))
        free = [b.num_free for b in engine.scheduler.blocks]
    for prompt, r in zip(PROMPTS, results, strict=True):
        assert r.tokens == reference_greedy(str(tiny_ckpt), prompt, 10)
    assert all(seqs_per_rank) and not seqs_per_rank[0] & seqs_per_rank[1]  # both used, no sequence moved
    assert free == [32, 32]
