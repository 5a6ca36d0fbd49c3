"""Fixtures of the model-core tests."""

from __future__ import annotations

import pytest

from moe_parallel import native


@pytest.fixture(params=native.supported_isas())
def isa(request):
    """Each ISA this CPU runs, forced (AVX2 and the scalar fallback on an AVX-512 machine stand in
    for CPUs without it), then back to the MOE_SERVE_KERNELS choice."""
    native.force(request.param)
    assert native.isa() == request.param
    yield request.param
    native.force(None)
