"""Application args are checked before anything starts, with the field named."""

from __future__ import annotations

import pytest

from deployments.app import resolve_model
from deployments.config import parse_args


@pytest.mark.parametrize(("change", "message"), [
    ({"expert_groups": 3}, "expert_groups=3 does not divide the model's 8 experts"),
    ({"layout": "sharded"}, "layout: Input should be 'disaggregated', 'colocated' or 'single'"),
    ({"attention_workers": 0}, "attention_workers: Input should be greater than or equal to 1"),
    ({"max_num_seqs": "many"}, "max_num_seqs: Input should be a valid integer"),
    ({"dtype": "int8"}, "dtype: Input should be"),
    ({"expert_group": 2}, "expert_group: Extra inputs are not permitted"),
    ({"model": "/nonexistent/model"}, "model: /nonexistent/model: no config.json"),
    ({"max_model_len": 10**6}, "max_model_len=1000000 exceeds the model's max_position_embeddings=4096"),
    ({"exchange": "tcp"}, "exchange: Input should be 'auto', 'gloo' or 'shm'"),
])
def test_bad_args_fail_fast_naming_the_field(tiny_ckpt, change, message):
    with pytest.raises(ValueError, match="invalid application args") as err:
        parse_args({"model": str(tiny_ckpt)} | change)
    assert message in str(err.value)


def test_good_args_and_defaults(tiny_ckpt):
    a = parse_args({"model": str(tiny_ckpt), "served_model_name": "m"})
    assert (a.layout, a.attention_workers, a.expert_groups, a.world, a.name) == ("disaggregated", 1, 2, 3, "m")
    assert a.context_len == 4096
    assert a.exchange == "auto"


def test_shipped_serve_config_parses(tmp_path):
    """serve_config.yaml is a valid Ray Serve config whose args validate against the app."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    from cluster.serve_env import API_PORT, PROXY_PORT, direct_ingress_ports

    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", PROXY_PORT)
    assert direct_ingress_ports().start == API_PORT and PROXY_PORT not in direct_ingress_ports()
    args = dict(app.args)
    if not (root / args["model"]).exists():
        from moe_parallel.loading.tiny import write_checkpoint

        write_checkpoint(tmp_path / "tiny")
        args["model"] = str(tmp_path / "tiny")
    a = parse_args(args | {"model": resolve_model(args["model"])})
    assert (a.layout, a.attention_workers, a.expert_groups) == ("disaggregated", 1, 2)


@pytest.mark.parametrize("layout", ["single", "disaggregated"])
def test_gpu_accelerator_reserves_a_gpu_for_every_worker(tiny_ckpt, layout):
    from deployments.app import make_app

    app = make_app({"model": str(tiny_ckpt), "layout": layout, "accelerator": "gpu"})
    engine = app._bound_deployment.init_args[0]._bound_deployment
    if layout == "single":  # the replica is the whole model
        assert engine.ray_actor_options["num_gpus"] == 1
    else:  # bundle 0 is the replica (no GPU), then one GPU per attention and expert worker
        bundles = engine._replica_config.placement_group_bundles
        assert "GPU" not in bundles[0] and [b["GPU"] for b in bundles[1:]] == [1.0, 1.0, 1.0]
    cpu = make_app({"model": str(tiny_ckpt), "layout": layout, "accelerator": "cpu"})
    cpu_engine = cpu._bound_deployment.init_args[0]._bound_deployment
    assert not cpu_engine.ray_actor_options.get("num_gpus")


def test_a_stopping_replica_polls_for_running_requests_often(tiny_ckpt):
    """Serve's replicas look for requests still running every 2 s while they stop, so an idle
    one took 2 s to go; the app's three deployments look every SHUTDOWN_POLL_S."""
    from deployments.app import SHUTDOWN_POLL_S, make_app

    app = make_app({"model": str(tiny_ckpt), "accelerator": "cpu"})
    ingress = app._bound_deployment
    engine, hub = ingress.init_args[0]._bound_deployment, ingress.init_args[1]._bound_deployment
    for dep in (ingress, engine, hub):
        assert dep._deployment_config.graceful_shutdown_wait_loop_s == SHUTDOWN_POLL_S < 2, dep.name
