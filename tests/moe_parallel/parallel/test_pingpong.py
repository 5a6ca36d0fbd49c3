"""Ping-pong micro-batches in the `disaggregated` layout: the same logits and tokens as
transformers for m = 1, 2, 3, with micro-batches that leave some expert ranks without rows
and micro-batches that are empty."""

from __future__ import annotations

import pytest

from bench.greedy import greedy
from moe_parallel.contract import SeqChunk
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from moe_parallel.step.runner import split
from tests.moe_parallel.cases import PROMPTS, STEPS, check_parity, make

CASES = [  # (variant, attention ranks, expert ranks, micro-batches)
    ("mixtral", 1, 2, 1),
    ("mixtral", 1, 2, 2),
    ("mixtral", 1, 4, 3),  # one decode token per micro-batch: two of four expert ranks get no rows
    ("mixed", 2, 3, 2),  # two attention ranks, sharded + windowed + 6 experts top-3
]


@pytest.mark.parametrize(("variant", "a", "n", "m"), CASES, ids=[f"{v}-{a}x{n}-m{m}" for v, a, n, m in CASES])
def test_micro_batches_match_transformers(tmp_path_factory, variant, a, n, m):
    path = make(tmp_path_factory.getbasetemp(), variant)
    with LocalInstance(InstanceSpec(str(path), "disaggregated", a, n, comm_timeout_s=30)) as inst:
        result = greedy(inst.step, PROMPTS, STEPS, ranks=a, micro_batches=m)
    check_parity(path, result)


def test_an_empty_micro_batch_still_takes_part(tmp_path_factory):
    """Two sequences over three micro-batches: the middle one is empty on every step, and its
    exchanges (no rows) keep the ranks in step."""
    from tests.reference import reference_greedy

    path = make(tmp_path_factory.getbasetemp(), "mixtral")
    prompts = PROMPTS[:2]
    assert [len(g) for g in split(tuple(SeqChunk(i, (1,), 0, (0,)) for i in range(2)), 3)] == [1, 0, 1]
    with LocalInstance(InstanceSpec(str(path), "disaggregated", 1, 2, comm_timeout_s=30)) as inst:
        result = greedy(inst.step, prompts, 8, micro_batches=3)
    assert result.tokens == [reference_greedy(str(path), p, 8) for p in prompts]


def test_split_keeps_order_and_balances_tokens():
    chunks = tuple(SeqChunk(i, (0,) * n, 0, (0,)) for i, n in enumerate([30, 2, 2, 2, 30, 1, 1]))
    groups = split(chunks, 2)
    assert [c.seq_id for g in groups for c in g] == list(range(7))  # contiguous, in order
    assert [sum(len(c.token_ids) for c in g) for g in groups] == [34, 34]
    assert split(chunks, 1) == [chunks]
