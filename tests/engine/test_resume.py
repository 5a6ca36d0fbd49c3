"""A request resumed from its tokens so far (`add_request(resume=...)`), as the ingress does
when the replica running it died: the rest of each completion is what an undisturbed run
gives, token for token and byte for byte, whatever the sampling (greedy, seeded with
penalties, a JSON grammar, a stop string, min_tokens, n=2 with one completion done)."""

from __future__ import annotations

import asyncio
import json

import pytest

from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import Guided, InvalidRequest, SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec

PROMPT = [1, *range(20, 34)]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
CASES = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    "seeded_penalties": SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True,
                                       presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3),
    "json": SamplingParams(temperature=0.8, seed=5, max_tokens=120, guided=Guided("json", json.dumps(SCHEMA))),
    "min_tokens": SamplingParams(temperature=1.0, seed=3, max_tokens=24, min_tokens=12),
    "n2": SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=20, ignore_eos=True, logprobs=2),
}


@pytest.fixture(scope="module")
def make(tiny_ckpt):
    runner = build_single(tiny_ckpt, max_model_len=256, cache=CacheSpec(num_blocks=64, block_size=8))

    def new():
        return make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=256))

    return new


async def outputs(engine, rid, params, resume=None):
    """Every output in order, by completion index."""
    got: dict[int, list] = {}
    async for out in engine.generate(rid, PROMPT, params, resume=resume):
        got.setdefault(out.index, []).append(out)
    return got


def whole(outs) -> tuple[list[int], str]:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_request_continues_as_if_undisturbed(make, case):
    params = CASES[case]

    async def main():
        ref = await outputs(make(), "ref", params)
        results = []
        for cut in (1, 5, 11):
            # the completions cut at `cut` outputs; with n=2, completion 1 already finished
            resume = {i: whole(outs[:cut])[0] for i, outs in ref.items() if i == 0 or params.n == 1}
            resumed = await outputs(make(), f"r{cut}", params, resume)  # a fresh engine: another replica
            results.append((cut, resume, resumed))
        return ref, results

    ref, results = asyncio.run(main())
    assert all(outs[-1].finish_reason is not None for outs in ref.values())
    for cut, resume, resumed in results:
        assert set(resumed) == set(resume)
        for i, outs in resumed.items():
            tokens, text = whole(outs)
            assert tokens == whole(ref[i][cut:])[0], (case, cut, i)
            assert text == whole(ref[i][cut:])[1], (case, cut, i)  # held-back bytes come out once, here
            assert outs[-1].finish_reason == ref[i][-1].finish_reason
            for got, want in zip(outs, ref[i][cut:], strict=True):  # a prefill's numbers, not a decode's:
                for g, w in zip(got.logprobs or (), want.logprobs or (), strict=True):  # close, not equal
                    assert g.token_id == w.token_id and g.logprob == pytest.approx(w.logprob, abs=1e-4)
                    assert [t for t, _ in g.top] == [t for t, _ in w.top]
    if case == "json":
        json.loads(whole(ref[0])[1])
    if case == "seeded_penalties":  # the check can fail: without the penalties' counts the rest differs
        bare = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)
        other = asyncio.run(outputs(make(), "bare", bare, {0: whole(ref[0][:5])[0]}))
        assert whole(other[0])[0] != whole(ref[0][5:])[0]


def test_a_resume_that_cannot_be_unfinished_is_refused(make):
    async def refused(params, resume):
        with pytest.raises(InvalidRequest) as e:
            await outputs(make(), "bad", params, resume)
        return str(e.value)

    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    assert "not one of" in asyncio.run(refused(greedy, {1: [5]}))
    assert "cannot be unfinished" in asyncio.run(refused(greedy, {0: [5, 6, 7, 8]}))
    assert "stop token" in asyncio.run(refused(greedy, {0: [5, 2]}))  # 2 is the tiny model's EOS
    assert "no unfinished" in asyncio.run(refused(greedy, {}))


def test_text_held_back_at_the_cut_comes_out_once_after_it(make):
    """A stop string that begins with the text of output k holds that text back when it comes
    (it could be the stop's start); a request cut right after output k must hand that text out
    with its next output, once: neither lost with the dead replica nor repeated."""
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = asyncio.run(outputs(make(), "plain", greedy))[0]
    k = next(j for j in range(2, len(plain) - 2) if plain[j].text.strip() and plain[j + 1].text
             and not plain[j + 1].text.startswith("\u0001"))
    held = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=(plain[k].text + "\u0001",))
    ref = asyncio.run(outputs(make(), "ref", held))[0]
    assert ref[k].text == "" and ref[k + 1].text.startswith(plain[k].text)  # held back, then released
    resumed = asyncio.run(outputs(make(), "cut", held, {0: whole(ref[:k + 1])[0]}))[0]
    assert whole(resumed) == whole(ref[k + 1:])
    assert whole(ref[:k + 1])[1] + whole(resumed)[1] == whole(plain)[1]


def test_an_unseeded_request_resumes_with_draws_of_its_own(make):
    """No seed: the resumed completion goes on from its tokens to its full length, with draws
    of its own (README: "Streams that survive a replica's loss")."""
    params = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    ref = asyncio.run(outputs(make(), "ref", params))[0]
    resumed = asyncio.run(outputs(make(), "cut", params, {0: whole(ref[:6])[0]}))[0]
    assert len(whole(resumed)[0]) == 14 and resumed[-1].finish_reason == "length"
