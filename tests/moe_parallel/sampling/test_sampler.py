"""The sampler on hand-made logits, where the right answer can be worked out by hand."""

from __future__ import annotations

import torch

from moe_parallel.contract import SamplingParams, SeqChunk
from moe_parallel.sampling.sampler import Sampler


def sample(logits, history, params, prompt_len=1, seed=0, sampler=None):
    sampler = sampler or Sampler(eos_token_ids=(2,))
    chunk = SeqChunk(0, tuple(history), 0, (0,), params, prompt_len, seed)
    sampler.observe(chunk)
    return sampler(torch.tensor([logits]), [chunk])[0]


def test_presence_and_frequency_penalties_follow_openai():
    # token 3 appeared twice in the output, token 4 once; token 0 only in the prompt (not penalised)
    logits = [5.0, 0.0, 0.0, 5.5, 5.2]
    history = [0, 3, 3, 4]
    assert sample(logits, history, SamplingParams(temperature=0)).token_id == 3
    # frequency 0.4: 3 -> 5.5 - 0.8 = 4.7, 4 -> 5.2 - 0.4 = 4.8, 0 stays 5.0
    assert sample(logits, history, SamplingParams(temperature=0, frequency_penalty=0.4)).token_id == 0
    # presence 0.4: 3 -> 5.1, 4 -> 4.8, 0 -> 5.0
    assert sample(logits, history, SamplingParams(temperature=0, presence_penalty=0.4)).token_id == 3


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = [0.0, 0.0, 9.0, 8.0, 1.0]
    assert sample(logits, [0], SamplingParams(temperature=0)).token_id == 2
    assert sample(logits, [0], SamplingParams(temperature=0, min_tokens=1)).token_id == 3
    assert sample(logits, [0], SamplingParams(temperature=0, min_tokens=1, stop_token_ids=(3,))).token_id == 4
    assert sample(logits, [0, 4], SamplingParams(temperature=0, min_tokens=1)).token_id == 2  # reached


def test_top_k_top_p_min_p_restrict_the_draw():
    logits = [3.0, 2.9, 1.0, 0.5, 0.0]
    draws = lambda p: {sample(logits, [0], p, seed=s).token_id for s in range(200)}  # noqa: E731
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.5)) == {0, 1}  # p(0) ~ 0.47 < 0.5
    assert draws(SamplingParams(temperature=1.0, min_p=0.5)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0)) >= {0, 1, 2, 3}


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1, 1e-9, 1e-9])).tolist()
    counts = torch.zeros(5)
    sampler = Sampler(eos_token_ids=(2,))
    for s in range(3000):
        counts[sample(logits, [0], SamplingParams(temperature=1.0), seed=s, sampler=sampler).token_id] += 1
        sampler.drop((0,))
    freq = counts / counts.sum()
    assert torch.allclose(freq[:3], torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_logprobs_are_from_the_raw_distribution():
    logits = [2.0, 1.0, 0.0, -1.0, -2.0]
    out = sample(logits, [0], SamplingParams(temperature=0.5, seed=1, logprobs=2))
    raw = torch.log_softmax(torch.tensor(logits), -1)
    assert abs(out.logprob - raw[out.token_id].item()) < 1e-6
    assert [t for t, _ in out.top_logprobs] == [0, 1]
    assert abs(out.top_logprobs[1][1] - raw[1].item()) < 1e-6


def test_a_draw_at_the_top_of_the_unit_interval_never_picks_an_excluded_token(monkeypatch):
    """u within 2^-25 of 1 used to round to the CDF's total in float32 and land on the last
    column, a token min_p or top-p had excluded."""
    from moe_parallel.sampling import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "uniform", lambda seed, position: 1.0 - 2.0**-30)
    logits = [3.0, 2.9, 1.0, 0.5, 0.0]
    assert sample(logits, [0], SamplingParams(temperature=1.0, min_p=0.5)).token_id in (0, 1)
    assert sample(logits, [0], SamplingParams(temperature=1.0, top_p=0.5)).token_id in (0, 1)
    assert sample(logits, [0], SamplingParams(temperature=1.0, top_k=2)).token_id in (0, 1)


def test_a_vanishing_temperature_is_greedy():
    logits = [1.0, 5.0, 2.0, 0.5]
    for t in (1e-50, 1e-41, 1e-6):
        assert sample(logits, [0], SamplingParams(temperature=t)).token_id == 1
        assert sample(logits, [0], SamplingParams(temperature=t, top_p=0.9)).token_id == 1


def test_greedy_rows_pick_argmax_the_first_of_equal_maxima():
    """The greedy pick of a batch is torch's argmax row by row (what transformers' greedy search
    takes): the first index among equal maxima, a NaN's index where a row has one."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 1000, generator=g)
    logits[1, [10, 700]] = 50.0  # a tie: the first one
    logits[2] = 3.0  # every entry equal
    logits[3, 400] = float("nan")
    chunks = [SeqChunk(i, (1,), 0, (0,), SamplingParams(temperature=0), 1, i) for i in range(9)]
    sampler = Sampler(eos_token_ids=(2,))
    for c in chunks:
        sampler.observe(c)
    got = [o.token_id for o in sampler(logits, chunks)]
    assert got == logits.argmax(dim=-1).tolist()
    assert got[1:4] == [10, 0, 400]
