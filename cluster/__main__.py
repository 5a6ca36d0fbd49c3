"""Command line: `python -m cluster plan | up | status | down`.

    python -m cluster plan MODEL_DIR_OR_CONFIG --dtype bfloat16 --gpus 8 --gpu-memory 80
    python -m cluster plan CONFIG --attention-gpus 2 --attention-gpu-memory 80 \\
                                  --expert-gpus 8 --expert-gpu-memory 48
    python -m cluster up [--address HOST:PORT] [--num-cpus N]   # start a head on loopback, or join
    python -m cluster status                                     # resources and running model instances
    python -m cluster down                                       # stop Ray on this machine

Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from cluster.plan import GpuPool, PlanError, make_plan, render, render_memory
from cluster.serve_env import SERVE_ENV
from moe_parallel.model.config import CheckpointError, ModelConfig
from moe_parallel.model.quant import QuantConfig


def load_config(path: str) -> ModelConfig:
    p = Path(path)
    if p.is_file():
        return ModelConfig.from_dict(json.loads(p.read_text()))
    return ModelConfig.from_dir(p)


def cmd_plan(args) -> int:
    c = load_config(args.model)
    if args.expert_gpus:
        attention = GpuPool(args.attention_gpus or args.gpus, args.attention_gpu_memory or args.gpu_memory,
                            "attention_gpu")
        experts = GpuPool(args.expert_gpus, args.expert_gpu_memory or args.gpu_memory, "expert_gpu")
    else:
        attention, experts = GpuPool(args.gpus, args.gpu_memory), None
    plan = make_plan(c, args.dtype, attention, experts, args.attention_ranks, args.expert_ranks,
                     gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                     name=Path(args.model).name, block_size=args.block_size,
                     quant=QuantConfig(args.quantization, group_size=args.group_size),
                     quantize_dense=args.quantize_dense)
    print(render(plan))
    print()
    print(render_memory(c, args.dtype, args.expert_gpu_memory or args.gpu_memory))
    return 0


def cmd_up(args) -> int:
    base = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    if args.address:
        cmd = base + ["--address", args.address]
    else:
        cmd = base + ["--head", "--node-ip-address", "127.0.0.1", "--port", str(args.port), "--include-dashboard",
                      "false"]
    if args.num_cpus is not None:
        cmd += ["--num-cpus", str(args.num_cpus)]
    return subprocess.call(cmd, env=SERVE_ENV | os.environ)  # Serve's switches, unless set otherwise


def cmd_status(args) -> int:
    import ray

    _same_auth_as_ray_start()
    if args.address and not _reachable(args.address):
        raise SystemExit(f"error: no Ray cluster answers at {args.address}")
    try:
        ray.init(address=args.address or "auto", log_to_driver=False, logging_level="error")
    except ConnectionError:
        raise SystemExit("error: no Ray cluster is running here (start one with `python -m cluster up`)") from None
    print("Resources (total):", json.dumps(ray.cluster_resources(), sort_keys=True))
    print("Resources (free): ", json.dumps(ray.available_resources(), sort_keys=True))
    print(instances_summary())
    ray.shutdown()
    return 0


def _reachable(address: str, timeout_s: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _same_auth_as_ray_start() -> None:
    """`ray start` turns token authentication on when a token exists; a client must match."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def instances_summary() -> str:
    """Model instances = running engine replicas of every Serve application."""
    try:
        from ray import serve

        status = serve.status()
    except Exception:
        return "Serve is not running: no model instances."
    lines = []
    for name, app in status.applications.items():
        engine = app.deployments.get("MoEEngine")
        if engine is not None:
            lines.append(f"app {name!r}: {engine.replica_states.get('RUNNING', 0)} model instance(s) running "
                         f"({app.status})")
    return "\n".join(lines) or "No model instances are running."


def cmd_down(args) -> int:
    return subprocess.call([sys.executable, "-m", "ray.scripts.scripts", "stop"])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cluster", description="Plan, start and inspect a cluster.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="placement of one model instance over GPUs")
    p.add_argument("model", help="checkpoint directory or its config.json")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--attention-gpus", type=int)
    p.add_argument("--attention-gpu-memory", type=float)
    p.add_argument("--expert-gpus", type=int, help="a second pool of GPUs for the experts")
    p.add_argument("--expert-gpu-memory", type=float)
    p.add_argument("--attention-ranks", type=int)
    p.add_argument("--expert-ranks", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of each GPU a worker may use (the app arg of the same name)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (the app arg of the same name)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                   help="the experts' weight-only quantization (the app arg of the same name)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256], help="int4 group size")
    p.add_argument("--quantize-dense", action="store_true", help="quantize attention projections and lm_head too")
    p.set_defaults(func=cmd_plan)
    u = sub.add_parser("up", help="start a Ray head on loopback, or join a cluster")
    u.add_argument("--address", help="join this head instead of starting one")
    u.add_argument("--port", type=int, default=6379)
    u.add_argument("--num-cpus", type=int)
    u.set_defaults(func=cmd_up)
    s = sub.add_parser("status", help="resources and running model instances")
    s.add_argument("--address")
    s.set_defaults(func=cmd_status)
    d = sub.add_parser("down", help="stop Ray on this machine")
    d.set_defaults(func=cmd_down)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (PlanError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
