"""A model instance as Ray actors in a placement group: parity, health, and clean teardown."""

from __future__ import annotations

import asyncio
import time

from cluster.instance import RayExecutor, RayInstance
from engine.engine import EngineConfig
from engine.factory import make_engine
from moe_parallel.sampling_params import SamplingParams
from moe_parallel.workers import InstanceSpec
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
