"""Shared fixtures: tiny checkpoints made on the fly, and the transformers reference."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"

# An idle Ray node with Serve and an app on it takes about a fifth of a core here (controller,
# GCS, the app's replicas and rank actors: 10-35 ms/s each), taken from every test that runs
# beside it. So the modules that use the session's Ray node run last, those of the shared app
# first among them, and the shared app goes as soon as its last test is done (`release`).
RAY = "ray_local"
RELEASED_EARLY = ("shared_url",)
_last_user: dict[str, str] = {}
_releases: dict[str, Callable[[], None]] = {}


def pytest_collection_modifyitems(session, config, items):
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def rank(module: str) -> int:
        names = {n for item in modules[module] for n in item.fixturenames}
        return 0 if RAY not in names else 1 if names & set(RELEASED_EARLY) else 2

    order = sorted(modules, key=rank)  # stable: the collection's order within each rank
    items[:] = [item for module in order for item in modules[module]]
    for item in items:
        for name in RELEASED_EARLY:
            if name in item.fixturenames:
                _last_user[name] = item.nodeid


def release_early(name: str, fn: Callable[[], None]) -> None:
    """Run `fn` when the last test that uses fixture `name` is done (or at its own teardown,
    whichever comes first; it runs once)."""
    _releases[name] = fn


def release(name: str) -> None:
    fn = _releases.pop(name, None)
    if fn is not None:
        fn()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name, last in _last_user.items():
        if last == item.nodeid:
            release(name)


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
        # the tests' clients connect to the ingress port itself and no load balancer needs to
        # see a stopping replica go: every app deleted here stops in 0.5 s, not 2 s
        env.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0.5")
        with serve_env.applied():
            ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=True, log_to_driver=False,
                     configure_logging=False)
    INGRESS_PORTS = range(base, base + 32)
    yield ray
    ray.shutdown()
