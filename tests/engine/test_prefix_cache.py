"""Prefix caching: the same tokens with caching on and off (greedy and seeded, through
preemption, abort and eviction), prefills skipped, `n > 1` sharing its prompt blocks, and a
block in use never handed to anyone else (property-based, on the block manager alone)."""

from __future__ import annotations

import asyncio

import pytest

from engine.block_manager import BlockManager
from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from engine.sequence import Sequence
from moe_parallel.contract import SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec
from tests.engine.helpers import RecordingExecutor, collect

SYSTEM = [1, *range(30, 30 + 45)]  # a shared 46-token prefix: two full blocks of 16 and a partial one
PROMPTS = [SYSTEM + [100 + i, 101 + i, 102 + i] for i in range(6)]


def engine_on(tiny_ckpt, caching: bool, blocks: int = 256, max_len: int = 128, recording: bool = False):
    runner = build_single(tiny_ckpt, max_model_len=max_len, cache=CacheSpec(num_blocks=blocks, block_size=16))
    executor = RecordingExecutor(runner) if recording else InProcessExecutor(runner)
    return make_engine(executor, tiny_ckpt, EngineConfig(max_model_len=max_len, enable_prefix_caching=caching,
                                                         max_num_batched_tokens=64))


async def _in_waves(engine, prompts, params, abort_one: bool = False):
    """Requests arrive in two waves, so the second finds the first's prefix cached."""
    first = await asyncio.gather(*[collect(engine, f"a{i}", p, params) for i, p in enumerate(prompts[:2])])
    tasks = [asyncio.create_task(collect(engine, f"b{i}", p, params)) for i, p in enumerate(prompts[2:])]
    if abort_one:
        await asyncio.sleep(0.05)
        tasks[0].cancel()
    rest = await asyncio.gather(*tasks, return_exceptions=True)
    return [r[0].tokens for r in first] + [None if isinstance(r, BaseException) else r[0].tokens for r in rest]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                    SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True,
                                                   repetition_penalty=1.2, n=2)], ids=["greedy", "seeded-n2"])
def test_same_tokens_with_and_without_caching(tiny_ckpt, params):
    off = engine_on(tiny_ckpt, caching=False)
    on = engine_on(tiny_ckpt, caching=True)
    expected = asyncio.run(_in_waves(off, PROMPTS, params))
    got = asyncio.run(_in_waves(on, PROMPTS, params))
    assert got == expected
    blocks = on.scheduler.blocks[0]
    assert blocks.hits >= 4 * 32 and blocks.queries > blocks.hits  # the second wave skipped two blocks each


def test_same_tokens_through_preemption_eviction_and_abort(tiny_ckpt):
    """A pool of 12 blocks for six 89-token sequences: preemptions, and cached blocks evicted
    for new ones; one request is aborted mid-way. The survivors' tokens do not change."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    off = engine_on(tiny_ckpt, caching=False, blocks=12, max_len=96)
    on = engine_on(tiny_ckpt, caching=True, blocks=12, max_len=96)
    expected = asyncio.run(_in_waves(off, PROMPTS, params))
    got = asyncio.run(_in_waves(on, PROMPTS, params, abort_one=True))
    assert on.scheduler.preemptions > 0 and on.scheduler.blocks[0].evictions > 0
    assert got[0:2] == expected[0:2] and got[3:] == expected[3:]
    blocks = on.scheduler.blocks[0]
    assert blocks.num_free == blocks.num_blocks  # nothing leaked
    assert sum(r == 0 for r in blocks.ref) == blocks.num_blocks


def test_cached_prefix_is_not_prefilled_again(tiny_ckpt):
    engine = engine_on(tiny_ckpt, caching=True, recording=True)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    asyncio.run(collect(engine, "first", PROMPTS[0], params))
    before = len(engine.executor.batches)
    [out] = asyncio.run(collect(engine, "second", PROMPTS[1], params))
    first_chunk = engine.executor.batches[before].chunks[0]
    assert first_chunk.start == 32 and first_chunk.history == tuple(PROMPTS[1][:32])  # two blocks from the cache
    assert len(first_chunk.token_ids) == len(PROMPTS[1]) - 32


def test_n_choices_share_the_prompt_blocks(tiny_ckpt):
    engine = engine_on(tiny_ckpt, caching=True)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True, n=4)

    async def main():
        task = asyncio.create_task(collect(engine, "n4", PROMPTS[0], params))
        tables = []
        while not task.done():
            seqs = [s for s in engine.scheduler.running if s.request_id == "n4"]
            if len(seqs) == 4:
                tables = [list(s.blocks[:2]) for s in seqs]
            await asyncio.sleep(0.001)
        return tables, await task

    tables, outs = asyncio.run(main())
    assert len(tables) == 4 and all(t == tables[0] for t in tables)  # one copy of the prompt's full blocks
    assert len({tuple(o.tokens) for o in outs}) > 1


# -- the block manager alone --------------------------------------------------------------------

def _seq(i: int, tokens: list[int]) -> Sequence:
    return Sequence(i, f"r{i}", 0, tokens, SamplingParams(), 0, 8)


def test_blocks_in_use_are_never_handed_out_again():
    """Random admissions, growth, commits and frees on a small pool (evictions included): a
    block is either free or held, never both; a block held by two sequences is a cached one and
    holds the same tokens for both; a cache hit holds exactly the tokens it was found for."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 7), st.integers(0, 3)),
                   max_size=60)

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(ops)
    def run(program):
        bm = BlockManager(12, 4)
        live: dict[int, Sequence] = {}
        written: dict[int, tuple] = {}  # hash -> the tokens its block was computed from

        def commit(seq):
            bm.commit(seq, 0)  # every full block, whatever this program computed last
            for j, b in enumerate(seq.blocks[: seq.num_computed // 4]):
                if bm.hash_of[b] is not None:
                    written.setdefault(bm.hash_of[b], tuple(seq.all_ids[j * 4:(j + 1) * 4]))

        for n, (op, i, k) in enumerate(program):
            if op == "admit" and i not in live:
                seq = _seq(n, [1, 2, 3, 4, 5, 6, 7, 8, 9][: 5 + k] + [k])  # prompts share prefixes
                hit = bm.match(seq)
                for j, b in enumerate(hit):
                    assert written[bm.hash_of[b]] == tuple(seq.all_ids[j * 4:(j + 1) * 4])
                bm.acquire(seq, hit)
                if bm.allocate(seq, seq.num_tokens):
                    seq.num_computed = seq.num_tokens
                    commit(seq)
                    live[i] = seq
                else:
                    bm.free(seq)
            elif op == "grow" and i in live:
                seq = live[i]
                seq.output_ids.append(k)
                if bm.allocate(seq, seq.num_tokens):
                    seq.num_computed = seq.num_tokens
                    commit(seq)
                else:
                    seq.output_ids.pop()
            elif op == "free" and i in live:
                bm.free(live.pop(i))
            holders: dict[int, list] = {}
            for s in live.values():
                for j, b in enumerate(s.blocks):
                    holders.setdefault(b, []).append((s, j))
            assert not set(holders) & set(bm.free_blocks)
            assert len(holders) + bm.num_free == bm.num_blocks
            for b, hs in holders.items():
                assert bm.ref[b] == len(hs)
                if len(hs) > 1:
                    assert bm.hash_of[b] is not None
                    assert len({tuple(s.all_ids[j * 4:(j + 1) * 4]) for s, j in hs}) == 1

    run()
