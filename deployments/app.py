"""The Ray Serve application: `import_path: deployments.app:build_app` in serve_config.yaml.

    OpenAIIngress (FastAPI) --stream--> MoEEngine replicas (one model instance each)
                  \\--metrics--> MetricsHub <--push-- MoEEngine replicas

`build_app(args)` validates the args first (a bad field fails before anything starts), then
reserves each engine replica's whole instance through `placement_group_bundles`: bundle 0 for
the replica, then one bundle per attention or expert worker.
"""

from __future__ import annotations

from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.serve_env import REPLICA_ENV
from deployments.config import parse_args
from deployments.engine_deployment import EngineDeployment, uses_gpu, worker_bundles
from deployments.ingress import OpenAIIngress
from deployments.metrics import MetricsHub

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REPLICA_CPUS = 0.1
INGRESS_MAX_ONGOING = 1024  # the ingress only waits on engine streams; it can hold many
SHUTDOWN_POLL_S = 0.25  # how often a stopping replica looks for requests still running


def resolve_model(model: str) -> str:
    """Relative checkpoint paths are taken from the working directory, else from the project root."""
    path = Path(model)
    if path.is_absolute():
        return str(path)
    for base in (Path.cwd(), PROJECT_ROOT):
        if (base / path).exists():
            return str((base / path).resolve())
    return model


def build_app(args: dict) -> Application:
    return make_app(args)


def make_app(args: dict, engine_options: dict | None = None) -> Application:
    """`build_app` with deployment options for the engine given in code (tests, scripts)."""
    args = dict(args) | {"model": resolve_model(str(args.get("model", "")))}
    a = parse_args(args)
    args = a.model_dump()
    # no access log line per call: the engine replicas report to the hub every second, and the
    # ingress logs one line per client request itself
    logs = {"enable_access_log": False, "encoding": a.log_format.upper()}
    # a stopping replica checks for requests still running every SHUTDOWN_POLL_S, not Serve's 2 s:
    # an idle one exits at once when it is scaled down, replaced or deleted
    hub = MetricsHub.options(logging_config=logs, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S).bind(a.name, {
        "layout": a.layout, "dtype": a.dtype, "quantization": a.quant().scheme,
        "quantize_dense": str(a.quantize_dense).lower()})
    # Serve's default of 5 requests in flight per replica would starve continuous batching:
    # a replica takes as many as its engine runs at once (serve_config.yaml may override).
    engine = serve.deployment(EngineDeployment, name="MoEEngine", health_check_period_s=2,
                              health_check_timeout_s=30, max_ongoing_requests=a.max_num_seqs,
                              graceful_shutdown_timeout_s=a.drain_timeout_s,
                              graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S, logging_config=logs)
    if a.layout == "single":  # the replica is the whole model: it gets the GPU itself
        engine = engine.options(ray_actor_options=_actor({"num_cpus": 1, "num_gpus": 1 if uses_gpu(a) else 0}))
    else:
        engine = engine.options(ray_actor_options=_actor({"num_cpus": REPLICA_CPUS}),
                                placement_group_bundles=[{"CPU": REPLICA_CPUS}, *worker_bundles(a)],
                                placement_group_strategy="PACK")
    if a.enable_prefix_caching:  # a prompt's opening picks its replica, where its prefix is cached
        engine = engine.options(request_router_config=RequestRouterConfig(
            request_router_class="deployments.routing:PrefixHashRouter"))
    if engine_options:
        options = dict(engine_options)
        if "ray_actor_options" in options:
            options["ray_actor_options"] = _actor(options["ray_actor_options"])
        engine = engine.options(**options)
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", ray_actor_options=_actor({"num_cpus": 0.1}),
                               max_ongoing_requests=INGRESS_MAX_ONGOING, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
                               logging_config=logs)
    return ingress.bind(engine.bind(args, hub), hub, args)


def _actor(options: dict) -> dict:
    """Replica actor options with Serve's per-replica switches (REPLICA_ENV) in their environment
    (direct ingress is the cluster's to turn on: Serve's controller hands out its ports)."""
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = REPLICA_ENV | dict(runtime_env.get("env_vars") or {})
    return options | {"runtime_env": runtime_env}
