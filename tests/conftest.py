"""Shared fixtures: tiny checkpoints made on the fly, and the transformers reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from moe_parallel.loading.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared; in CI its absence is a failure, elsewhere a skip."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must provide ../shared")
        pytest.skip(reason=f"{path} is not available outside CI")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A Ray node on loopback for the whole session, stopped at the end."""
    import ray

    from cluster import serve_env

    with serve_env.applied():  # the cluster as `make serve` and the Helm chart start it
        ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=True, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
