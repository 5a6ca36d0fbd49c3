"""The multi-process layouts against transformers, each rank a separate OS process on gloo."""

from __future__ import annotations

import pytest

from bench.greedy import greedy
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.names import dense_shapes
from moe_parallel.parallel.launch import LocalInstance
from moe_parallel.parallel.workers import InstanceSpec
from tests.moe_parallel.cases import PROMPTS, STEPS, check_parity, make

CASES = [
    ("mixtral", "disaggregated", 1, 1),
    ("mixtral", "disaggregated", 1, 2),
    ("mixtral", "disaggregated", 2, 4),
    ("mixtral", "colocated", 2, 0),
    ("mixed", "disaggregated", 2, 3),
    ("mixed", "colocated", 2, 0),
]


@pytest.mark.parametrize(("variant", "layout", "a", "n"), CASES, ids=[f"{v}-{lay}-{a}x{n}" for v, lay, a, n in CASES])
def test_layout_matches_transformers(tmp_path_factory, variant, layout, a, n):
    path = make(tmp_path_factory.getbasetemp(), variant)
    c = ModelConfig.from_dir(path)
    with LocalInstance(InstanceSpec(str(path), layout, a, n, comm_timeout_s=30)) as inst:
        result = greedy(inst.step, PROMPTS, STEPS, ranks=a)
        read = inst.tensors_read
    check_parity(path, result)
    dense = len(dense_shapes(c))
    if layout == "disaggregated":
        # attention ranks read the dense tensors only; each expert rank its own E/N experts only
        assert read[:a] == [dense] * a
        assert read[a:] == [3 * c.num_layers * c.num_experts // n] * n
    else:
        assert read == [dense + 3 * c.num_layers * c.num_experts // a] * a
