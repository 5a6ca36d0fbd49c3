"""Ray Serve's switches (cluster/serve_env.py) reach every way the cluster starts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from cluster.serve_env import REPLICA_ENV, SERVE_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_make_serve_starts_the_cluster_with_the_same_switches():
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = re.search(r"^SERVE_ENV := (.*)$", text, re.M)
    assert line, "the Makefile has no SERVE_ENV"
    assert dict(kv.split("=", 1) for kv in line.group(1).split()) == SERVE_ENV
    assert re.search(r"^serve:.*\n\tenv \$\(SERVE_ENV\) .*serve run serve_config\.yaml", text, re.M)


def test_both_deployments_carry_them_in_their_actor_options(tiny_ckpt):
    from deployments.app import make_app

    app = make_app({"model": str(tiny_ckpt), "layout": "disaggregated", "accelerator": "cpu"},
                   {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {"X": "1"}}}})
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    for dep, extra in ((ingress, {}), (engine, {"X": "1"})):
        assert dep.ray_actor_options["runtime_env"]["env_vars"] == REPLICA_ENV | extra


def test_cluster_up_passes_them_to_ray_start(monkeypatch):
    import cluster.__main__ as cli

    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: seen.update(cmd=cmd, env=env) or 0)
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")  # a value set by the operator wins
    assert cli.main(["up", "--num-cpus", "2"]) == 0
    assert "start" in seen["cmd"]
    assert seen["env"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert seen["env"]["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"


def test_applied_sets_them_for_ray_start_only(monkeypatch):
    import os

    from cluster import serve_env

    monkeypatch.delenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", raising=False)
    monkeypatch.setenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", "0")
    with serve_env.applied():
        assert os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "0"
        assert os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"  # the operator's value wins
    assert "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP" not in os.environ  # this process keeps Serve's defaults
    assert os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"
