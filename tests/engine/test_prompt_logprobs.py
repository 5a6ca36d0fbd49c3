"""Prompt logprobs computed in the prefill equal transformers' log-softmax at every prompt
position, whole or chunked (prompts longer than `max_num_batched_tokens`), in `single` and
`disaggregated`; a scoring call (max_tokens 0) generates nothing; a preempted sequence reports
each position once."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.engine import EngineConfig
from engine.executor import InProcessExecutor, LocalProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import InvalidRequest, SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from moe_parallel.step.cache_size import CacheSpec
from tests.reference import reference_logits

PROMPTS = [[1, *range(3, 90)], [1, 40, 41, 42], [1, *range(100, 230)], [1, 7]]
K = 5


def expected(ckpt, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' log-softmax of each prompt token given the ones before it [L-1], and the
    top-K alternatives' values [L-1, K]."""
    lsm = torch.log_softmax(reference_logits(str(ckpt), prompt), dim=-1)[:-1]
    chosen = lsm.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    return chosen, lsm.topk(K, dim=-1)


async def _score(engine, prompts, params):
    async def one(i, p):
        outs = [o async for o in engine.generate(f"s{i}", p, params)]
        return outs

    return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])


def check(ckpt, prompts, results, generated: int) -> None:
    for prompt, outs in zip(prompts, results, strict=True):
        first = outs[0].prompt_logprobs
        assert first is not None and len(first) == len(prompt) and first[0] is None
        assert all(o.prompt_logprobs is None for o in outs[1:])  # sent once, with the first piece
        assert sum(len(o.token_ids) for o in outs) == generated
        chosen, (top_values, top_ids) = expected(ckpt, prompt)
        got = torch.tensor([e.logprob for e in first[1:]])
        assert [e.token_id for e in first[1:]] == prompt[1:]
        torch.testing.assert_close(got, chosen, atol=1e-4, rtol=0)
        got_top = torch.tensor([[v for _, v in e.top] for e in first[1:]])
        torch.testing.assert_close(got_top, top_values, atol=1e-4, rtol=0)
        assert [[t for t, _ in e.top] for e in first[1:]] == top_ids.tolist()
        ranks = [e.rank for e in first[1:]]
        lsm = torch.log_softmax(reference_logits(str(ckpt), prompt), dim=-1)[:-1]
        assert ranks == ((lsm > chosen[:, None]).sum(-1) + 1).tolist()


@pytest.mark.parametrize("budget", [512, 32])  # 32: every long prompt is split over several steps
def test_single_matches_transformers(tiny_ckpt, budget):
    runner = build_single(tiny_ckpt, max_model_len=256)
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt,
                         EngineConfig(max_model_len=256, max_num_batched_tokens=budget))
    scoring = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=K)
    check(tiny_ckpt, PROMPTS, asyncio.run(_score(engine, PROMPTS, scoring)), generated=0)
    with_tokens = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=K, ignore_eos=True)
    check(tiny_ckpt, PROMPTS, asyncio.run(_score(engine, PROMPTS, with_tokens)), generated=3)


def test_disaggregated_chunked_matches_transformers(tiny_ckpt):
    spec = InstanceSpec(str(tiny_ckpt), "disaggregated", 2, 2, max_model_len=256, comm_timeout_s=30,
                        cache=CacheSpec(num_blocks=64, block_size=16, max_num_batched_tokens=32))
    with LocalInstance(spec) as inst:
        engine = make_engine(LocalProcessExecutor(inst), tiny_ckpt,
                             EngineConfig(max_model_len=256, max_num_batched_tokens=32))
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=K, ignore_eos=True)
        check(tiny_ckpt, PROMPTS, asyncio.run(_score(engine, PROMPTS, params)), generated=1)


def test_preempted_sequences_report_each_position_once(tiny_ckpt):
    """A KV pool too small for all four prompts at once: sequences are preempted mid-prompt and
    run their prompts again; the logprobs still come once per position and match."""
    runner = build_single(tiny_ckpt, max_model_len=160, cache=CacheSpec(num_blocks=20, block_size=8))
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt,
                         EngineConfig(max_model_len=160, max_num_batched_tokens=32))
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    results = asyncio.run(_score(engine, PROMPTS, params))
    assert engine.scheduler.preemptions > 0
    for prompt, outs in zip(PROMPTS, results, strict=True):
        first = outs[0].prompt_logprobs
        chosen, _ = expected(tiny_ckpt, prompt)
        torch.testing.assert_close(torch.tensor([e.logprob for e in first[1:]]), chosen, atol=1e-4, rtol=0)


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(max_tokens=0)
    assert e.value.param == "max_tokens"
