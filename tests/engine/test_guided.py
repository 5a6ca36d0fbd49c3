"""Constrained decoding in the engine: valid JSON through preemptions (a recomputed sequence
replays its tokens into a fresh matcher), the matcher built while the prefill runs, and a
grammar that leaves only the end of sequence beating min_tokens."""

from __future__ import annotations

import asyncio
import json

import jsonschema

from engine.engine import EngineConfig
from engine.executor import InProcessExecutor
from engine.factory import make_engine
from moe_parallel.contract import Guided, SamplingParams
from moe_parallel.loading.loader import build_single
from moe_parallel.step.cache_size import CacheSpec
from tests.engine.helpers import RecordingExecutor, run_all

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}
GUIDED = Guided("json", json.dumps(SCHEMA))


def test_valid_json_through_preemptions(tiny_ckpt):
    runner = build_single(tiny_ckpt, max_model_len=96, cache=CacheSpec(num_blocks=14, block_size=8))
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=96))
    prompts = [[1, *range(10 + i, 40 + i)] for i in range(6)]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, guided=GUIDED)
    results = asyncio.run(run_all(engine, prompts, params))
    assert engine.scheduler.preemptions > 0
    for r in results:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), SCHEMA)


def test_the_matcher_is_built_during_the_first_prefill_chunk(tiny_ckpt):
    runner = build_single(tiny_ckpt, max_model_len=256)
    executor = RecordingExecutor(runner)
    engine = make_engine(executor, tiny_ckpt, EngineConfig(max_model_len=256, max_num_batched_tokens=16))
    params = SamplingParams(temperature=0, max_tokens=40, guided=GUIDED)
    [out] = asyncio.run(run_all(engine, [[1, *range(3, 60)]], params))  # a 58-token prompt: 4 chunks
    jsonschema.validate(json.loads(out.text), SCHEMA)
    first = executor.batches[0].chunks[0]
    assert first.sampling is None and first.guided == GUIDED  # no sampling yet, but the grammar came along


def test_the_grammar_wins_over_min_tokens(tiny_ckpt):
    """A choice of 'ab' must end after two tokens; min_tokens 10 would hide the end: the end is
    allowed anyway, and the text is exactly the choice."""
    runner = build_single(tiny_ckpt, max_model_len=64)
    engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=64))
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=10, guided=Guided("choice", '["ab"]'))
    [out] = asyncio.run(run_all(engine, [[1, 5, 6]], params))
    assert out.text == "ab"


def test_a_fresh_engine_on_the_same_rank_starts_clean_grammars(tiny_ckpt):
    """Sequence ids start again at 0 in a new engine; the rank must not apply the grammar state
    (or penalty history) an earlier engine's sequence 0 left behind."""
    runner = build_single(tiny_ckpt, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=60, guided=GUIDED, repetition_penalty=1.3)
    outs = []
    for _ in range(2):
        engine = make_engine(InProcessExecutor(runner), tiny_ckpt, EngineConfig(max_model_len=128))
        [out] = asyncio.run(run_all(engine, [[1, 20, 21, 22]], params))
        outs.append(out.text)
    jsonschema.validate(json.loads(outs[1]), SCHEMA)
    assert outs[0] == outs[1]
