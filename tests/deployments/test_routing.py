"""Prefix-affine replica choice: the same opening prefers the same replica, openings spread
over the replicas, and a replica leaving moves only the openings it had."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from deployments.routing import PrefixHashRouter, prefix_key, rank

REPLICAS = [f"replica-{i}" for i in range(4)]


def test_same_opening_same_replica_and_spread():
    system = list(range(100, 164))
    a = rank(prefix_key(system + [1, 2, 3]), REPLICAS)
    b = rank(prefix_key(system + [9, 9, 9, 9, 9]), REPLICAS)
    assert a == b and sorted(a) == sorted(REPLICAS)  # every replica ranked, the preferred one shared
    firsts = {rank(prefix_key([i, i + 1, i + 2]), REPLICAS)[0] for i in range(200)}
    assert firsts == set(REPLICAS)


def test_a_replica_leaving_moves_only_its_openings():
    keys = [prefix_key([i, 7, i * 3]) for i in range(300)]
    before = {k: rank(k, REPLICAS)[0] for k in keys}
    after = {k: rank(k, REPLICAS[:-1])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == REPLICAS[-1] for k in moved)


def test_router_ranks_generate_calls_and_passes_others_through():
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=r)) for r in REPLICAS]
    router = PrefixHashRouter.__new__(PrefixHashRouter)  # the ranking alone, without Serve's state
    router.initialize_state(prefix_tokens=8)
    call = SimpleNamespace(args=("cmpl-1", list(range(40)), None, None))
    ranked = asyncio.run(router.choose_replicas(replicas, call))
    assert [g[0].replica_id.unique_id for g in ranked] == rank(prefix_key(list(range(40)), 8), REPLICAS)
    other = asyncio.run(router.choose_replicas(replicas, SimpleNamespace(args=())))
    assert other == [replicas]
