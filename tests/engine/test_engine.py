"""The engine on the `single` layout: batching, preemption, KV accounting, sampling, stops."""

from __future__ import annotations

import asyncio

import pytest

from engine.engine import EngineConfig
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec
from tests.engine.helpers import RecordingExecutor, collect, run_all
from tests.reference import reference_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = [[1, *range(10, 12 + 5 * i)] for i in range(16)]  # 3 to 78 tokens


def engine_for(path, num_blocks=256, block_size=16, **config):
    config = {"max_model_len": 512, "max_num_batched_tokens": 64} | config
    runner = build_single(path, cache=CacheSpec(num_blocks, block_size), max_model_len=config["max_model_len"])
    executor = RecordingExecutor(runner)
    return make_engine(executor, path, EngineConfig(**config))


def test_batch_invariance_against_alone_and_transformers(tiny_ckpt):
    async def main():
        together = await run_all(engine_for(tiny_ckpt), PROMPTS, GREEDY)
        alone = [(await run_all(engine_for(tiny_ckpt), [p], GREEDY))[0] for p in PROMPTS[::5]]
        return together, alone

    together, alone = asyncio.run(main())
    assert [c.tokens for c in together[::5]] == [c.tokens for c in alone]
    for prompt, c in zip(PROMPTS, together, strict=True):
        assert c.tokens == reference_greedy(str(tiny_ckpt), prompt, 20)
        assert c.finish_reason == "length"


def test_preemption_keeps_outputs_and_returns_blocks(tiny_ckpt):
    async def main():
        roomy = engine_for(tiny_ckpt)
        tight = engine_for(tiny_ckpt, num_blocks=40, block_size=4, max_model_len=160)  # 160 slots, 16 x ~60 tokens
        return await run_all(roomy, PROMPTS, GREEDY), await run_all(tight, PROMPTS, GREEDY), tight

    expected, got, tight = asyncio.run(main())
    assert tight.scheduler.preemptions > 0
    assert [c.tokens for c in got] == [c.tokens for c in expected]
    assert tight.scheduler.blocks[0].num_free == 40


def test_abort_and_finish_return_every_block(tiny_ckpt):
    async def main():
        engine = engine_for(tiny_ckpt, num_blocks=64, block_size=4, max_model_len=256)
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        stream = engine.generate("a", PROMPTS[3], long)
        await anext(stream)
        await anext(stream)
        in_use = 64 - engine.scheduler.blocks[0].num_free
        await stream.aclose()  # the client walks away: an abort
        while engine.scheduler.in_flight:  # a step under way keeps its blocks until it ends
            await asyncio.sleep(0.001)
        after_abort = engine.scheduler.blocks[0].num_free
        await collect(engine, "b", PROMPTS[4], GREEDY)
        return in_use, after_abort, engine.scheduler.blocks[0].num_free, engine

    in_use, after_abort, after_finish, engine = asyncio.run(main())
    assert in_use > 0
    assert after_abort == 64 and after_finish == 64
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    # the abort reached the rank: its sampler state for the aborted sequence is gone
    assert engine.executor.runner.sampler.states.keys() <= {1}


SAMPLING_PATHS = {  # each of the sampler's paths: sort (top-p), topk (top-k alone), none (plain, min-p)
    "top_p": dict(temperature=0.9, top_p=0.9, top_k=50),
    "top_k": dict(temperature=0.9, top_k=20),
    "plain": dict(temperature=1.1),
    "min_p": dict(temperature=1.0, min_p=0.05, presence_penalty=0.5),
}


@pytest.mark.parametrize("path", SAMPLING_PATHS)
def test_seeded_sampling_ignores_batch_composition(tiny_ckpt, path):
    params = SamplingParams(**SAMPLING_PATHS[path], seed=1234, max_tokens=16, ignore_eos=True)

    async def main():
        alone = (await collect(engine_for(tiny_ckpt), "x", PROMPTS[2], params))[0]
        engine = engine_for(tiny_ckpt)
        mixes = [dict(), dict(top_k=5), dict(top_k=100), dict(top_p=0.5), dict(min_p=0.2)]  # every path, other k
        others = [collect(engine, f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=9, **mixes[i % 5]))
                  for i, p in enumerate(PROMPTS[5:12])]
        crowded = (await asyncio.gather(collect(engine, "x", PROMPTS[2], params), *others))[0][0]
        other_seed = (await collect(engine_for(tiny_ckpt), "y", PROMPTS[2],
                                    SamplingParams(**SAMPLING_PATHS[path], seed=99, max_tokens=16,
                                                   ignore_eos=True)))[0]
        return alone, crowded, other_seed

    alone, crowded, other_seed = asyncio.run(main())
    assert alone.tokens == crowded.tokens
    assert alone.tokens != other_seed.tokens  # the seed matters: the check above can fail


def test_n_completions_and_logprobs(tiny_ckpt):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, logprobs=3, ignore_eos=True)
    outs = asyncio.run(collect(engine_for(tiny_ckpt), "n", PROMPTS[1], params))
    assert len(outs) == 3 and len({tuple(o.tokens) for o in outs}) > 1
    for o in outs:
        assert len(o.tokens) == 6 and len(o.logprobs) == 6
        for lp, tok in zip(o.logprobs, o.tokens, strict=True):
            assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
            assert lp.top[0][1] >= lp.logprob  # the best alternative is at least as likely
    greedy = asyncio.run(collect(engine_for(tiny_ckpt), "g", PROMPTS[1],
                                 SamplingParams(temperature=0, max_tokens=4, logprobs=1)))[0]
    assert all(lp.top[0] == (lp.token_id, lp.logprob) for lp in greedy.logprobs)


def test_repetition_penalty_matches_transformers(tiny_ckpt):
    import torch

    from tests.reference import reference_model

    model = reference_model(str(tiny_ckpt))

    def hf(prompt, penalty):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                             pad_token_id=0)
        return out[0, len(prompt):].tolist()

    # a prompt made of what the model wants to say next, so the penalty has something to bite on
    prompt = [1, 40, 41]
    prompt += hf(prompt, 1.0)[:6]
    assert hf(prompt, 1.8) != hf(prompt, 1.0), "the penalty must change the reference output"
    params = SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=12, ignore_eos=True)
    got = asyncio.run(collect(engine_for(tiny_ckpt), "p", prompt, params))[0]
    assert got.tokens == hf(prompt, 1.8)


def test_stop_string_across_tokens_is_cut_exactly(tiny_ckpt):
    base = asyncio.run(collect(engine_for(tiny_ckpt), "s", PROMPTS[6], GREEDY))[0]
    text = base.text
    k = next(i for i in range(2, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i)
    stop = text[k:k + 3]  # three characters: at least three byte tokens

    def run(include):
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=(stop,),
                                include_stop_str_in_output=include)
        return asyncio.run(collect(engine_for(tiny_ckpt), "s", PROMPTS[6], params))[0]

    cut, kept = run(False), run(True)
    assert cut.finish_reason == "stop" and cut.text == text[:k]
    assert kept.text == text[:k + 3]
    assert "".join(cut.deltas) == cut.text
    assert not any(stop[:2] in d for d in cut.deltas)  # no half of the stop string ever went out


def test_stop_token_ids_and_min_tokens(tiny_ckpt):
    base = asyncio.run(collect(engine_for(tiny_ckpt), "t", PROMPTS[7], GREEDY))[0]
    stop_tok = base.tokens[4]
    first = base.tokens.index(stop_tok)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=(stop_tok,))
    got = asyncio.run(collect(engine_for(tiny_ckpt), "t", PROMPTS[7], params))[0]
    assert got.finish_reason == "stop" and got.tokens == base.tokens[:first + 1]
    late = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=(stop_tok,),
                          min_tokens=first + 2)
    got = asyncio.run(collect(engine_for(tiny_ckpt), "t", PROMPTS[7], late))[0]
    assert len(got.tokens) >= first + 3
    assert stop_tok not in got.tokens[:first + 2]


def test_chunked_prefill_keeps_decoding_and_limits_hold(tiny_ckpt):
    async def main():
        engine = engine_for(tiny_ckpt, max_num_batched_tokens=8, max_num_seqs=2)
        first = asyncio.create_task(collect(engine, "d", [1, 5, 6], GREEDY))
        while engine.steps < 2:
            await asyncio.sleep(0.01)
        await asyncio.gather(first, collect(engine, "long", PROMPTS[10], GREEDY),
                             collect(engine, "third", PROMPTS[1], GREEDY))
        return engine.executor.batches

    batches = asyncio.run(main())
    assert max(b.num_tokens for b in batches) <= 8
    assert max(len(b.chunks) for b in batches) <= 2
    prefill_steps = [b for b in batches if any(len(c.token_ids) > 1 and c.seq_id == 1 for c in b.chunks)]
    assert len(prefill_steps) >= 5  # the 53-token prompt went in chunks
    assert all(any(c.seq_id == 0 for c in b.chunks) for b in prefill_steps[:-1])  # decoding went on meanwhile


def test_context_limit_error_names_both_numbers(tiny_ckpt):
    engine = engine_for(tiny_ckpt, max_model_len=64)

    async def main():
        await collect(engine, "big", [1] * 60, SamplingParams(max_tokens=10))

    with pytest.raises(ValueError, match=r"maximum context length is 64 tokens.*70 tokens \(60 in the prompt, 10"):
        asyncio.run(main())


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("top_p", 0.0), ("n", 0), ("max_tokens", 0),
                                              ("logprobs", 21), ("min_p", 2.0), ("presence_penalty", 3.0)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_a_traced_request_carries_its_hops_in_order_and_others_carry_none(tiny_ckpt):
    from engine.trace import STAMPS

    async def main():
        engine = engine_for(tiny_ckpt)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        traced = [o async for o in engine.generate("t", PROMPTS[2], params, trace=True)]
        plain = [o async for o in engine.generate("p", PROMPTS[2], params)]
        return traced, plain

    traced, plain = asyncio.run(main())
    assert all(o.trace is None for o in plain)
    engine_stamps = [s for s in STAMPS if s in ("arrival", "scheduled", "dispatched", "rank_start", "rank_end",
                                               "executed", "queued")]
    steps = []
    for o in traced:
        assert list(o.trace) == engine_stamps
        times = [o.trace[s] for s in engine_stamps]
        assert times == sorted(times), o.trace
        steps.append(o.trace["scheduled"])
    assert len(traced) == 6 and steps == sorted(steps) and len(set(steps)) == 6  # one step per token
    assert len({o.trace["arrival"] for o in traced}) == 1
