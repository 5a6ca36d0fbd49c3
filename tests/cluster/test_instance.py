"""A model instance as Ray actors in a placement group: parity, health, and clean teardown."""

from __future__ import annotations

import asyncio
import os
import time

import ray

from cluster.instance import RayExecutor, RayInstance
from engine.engine import EngineConfig
from engine.factory import make_engine
from moe_parallel.contract import SamplingParams
from moe_parallel.parallel.rank_start import RANK_ENV
from moe_parallel.parallel.workers import InstanceSpec
from tests.engine.helpers import run_all
from tests.reference import reference_greedy

PROMPTS = [[1, 2, 3, 4], [1, 50, 60], [1, *range(70, 95)]]


def test_ray_instance_serves_parity_and_leaves_nothing_behind(ray_local, tiny_ckpt):
    from ray.util.state import list_actors, list_placement_groups

    inst = RayInstance(InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=1, expert_ranks=2))
    pg_id = inst.pg.id.hex()
    actor_ids = {a._actor_id.hex() for a in inst.actors}
    try:
        health = inst.health()
        assert [h["role"] for h in health] == ["attention", "expert", "expert"]
        spin = lambda actor: os.environ.get("GOMP_SPINCOUNT")  # noqa: E731  (each actor's own process)
        assert ray.get([a.__ray_call__.remote(spin) for a in inst.actors]) == [RANK_ENV["GOMP_SPINCOUNT"]] * 3
        assert [h["first_expert"] for h in health[1:]] == [0, 4]
        engine = make_engine(RayExecutor(inst), tiny_ckpt, EngineConfig(max_model_len=256))
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        results = asyncio.run(run_all(engine, PROMPTS, params))
        for prompt, r in zip(PROMPTS, results, strict=True):
            assert r.tokens == reference_greedy(str(tiny_ckpt), prompt, 12)
        routed = sum(sum(map(sum, h["tokens_per_expert"])) for h in inst.health()[1:])
        # every token of every layer went to K=2 experts: prefill + 11 decode steps per prompt
        assert routed == 2 * 2 * sum(len(p) + 11 for p in PROMPTS)
    finally:
        inst.shutdown()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [a for a in list_actors() if a.actor_id in actor_ids and a.state != "DEAD"]
        pgs = [p for p in list_placement_groups() if p.placement_group_id == pg_id and p.state != "REMOVED"]
        if not alive and not pgs:
            break
        time.sleep(0.5)
    assert not alive and not pgs


def test_steps_go_through_a_shared_memory_channel_and_a_dead_rank_fails_the_step(ray_local, tiny_ckpt, monkeypatch):
    """On one CPU host the driver hands steps to the attention actors through a shared-memory
    channel instead of a Ray call each; MOE_SERVE_STEP_CHANNEL=0 keeps the Ray calls. Killing
    the attention actor fails the next step with its pid, and no segment stays in /dev/shm."""
    import os
    import signal

    import pytest
    import ray

    from moe_parallel.parallel import shm

    if shm.available():
        pytest.skip(f"shared-memory exchange unavailable: {shm.available()}")
    before = set(shm.leftovers())
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    monkeypatch.setenv("MOE_SERVE_STEP_CHANNEL", "0")
    plain = RayInstance(InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=1, expert_ranks=1))
    try:
        assert plain.channels == []
        expected = asyncio.run(run_all(make_engine(RayExecutor(plain), tiny_ckpt, EngineConfig(max_model_len=256)),
                                       PROMPTS, params))
    finally:
        plain.shutdown()
    monkeypatch.delenv("MOE_SERVE_STEP_CHANNEL")
    inst = RayInstance(InstanceSpec(str(tiny_ckpt), "disaggregated", attention_ranks=1, expert_ranks=1))
    try:
        assert len(inst.channels) == 1
        got = asyncio.run(run_all(make_engine(RayExecutor(inst), tiny_ckpt, EngineConfig(max_model_len=256)),
                                  PROMPTS, params))
        assert [r.tokens for r in got] == [r.tokens for r in expected]
        assert [r.tokens for r in got] == [reference_greedy(str(tiny_ckpt), p, 6) for p in PROMPTS]
        pid = int(inst.channels[0].seg.words[8 + 1])  # the rank's pid, in the channel's first page
        assert pid == ray.get(inst.attention_actors[0].pid.remote())
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(Exception) as err:
            asyncio.run(run_all(make_engine(RayExecutor(inst), tiny_ckpt, EngineConfig(max_model_len=256)),
                                PROMPTS[:1], params))
        chain, e = [], err.value
        while e is not None:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        assert any(f"step channel: the rank (pid {pid}) exited" in c for c in chain), chain
        assert time.monotonic() - start < 5
    finally:
        inst.shutdown()
    assert set(shm.leftovers()) - before == set()
