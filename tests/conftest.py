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


INGRESS_PORTS = range(0)  # the session cluster's direct-ingress ports, once it runs


def ingress_ports() -> range:
    return INGRESS_PORTS


def free_port_block(n: int) -> int:
    """The first of `n` consecutive free loopback ports, between Ray's worker ports and the
    ephemeral range."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


@pytest.fixture(scope="session")
def ray_local():
    """A Ray node on loopback for the whole session, stopped at the end: started as `make serve`
    and the Helm chart start it, but with its ingress replicas' own ports (direct ingress) on
    a free block instead of 8000 and up, so a server already running here does not collide."""
    import ray

    from cluster import serve_env

    global INGRESS_PORTS
    base = free_port_block(32)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(base))  # set first: applied() keeps them
        env.setenv("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(base + 32))
        with serve_env.applied():
            ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=True, log_to_driver=False,
                     configure_logging=False)
    INGRESS_PORTS = range(base, base + 32)
    yield ray
    ray.shutdown()
