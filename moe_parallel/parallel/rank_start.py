"""Rank processes forked from a server that has imported torch and DeepSpeed once.

A rank started afresh (`spawn`) spends seconds importing them, and an instance starts all its
ranks at once on the same cores. Multiprocessing's fork server imports them once per parent
process, and each rank is a fork of it. A rank must still see the parent's environment as it is
when the rank starts, not as it was when the server started: so the rank gets that environment
with its arguments, sets it, and only then imports the project's modules and unpickles its
arguments (settings read at import, such as MOE_SERVE_ATTENTION_TILE, are read then). The
preloaded libraries read none of the project's settings, and CUDA is never initialised in the
server (importing torch does not), so each rank still picks its own device.

This module imports nothing of the project at its top: it is the rank's entry point.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle

PRELOAD = ["torch", "deepspeed.comm"]


# Every rank process's environment before torch loads (libgomp reads it then): idle OpenMP
# workers spin about 1,000 pauses (tens of microseconds) before sleeping, not libgomp's default
# 300,000 (milliseconds), so threads a rank borrowed for a moment (`compute.burst`, an expert
# rank given every core for a layer) go back at once to the ranks that compute next. Ray's rank
# actors get it in their runtime_env (cluster/instance.py), local ranks from the fork server.
RANK_ENV = {"GOMP_SPINCOUNT": "1000"}


def context():
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    added = {k: v for k, v in RANK_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        forkserver.ensure_running()  # started now, with that environment (a no-op once it runs)
    finally:
        for k in added:
            del os.environ[k]
    return ctx


def process(ctx, target: str, args: tuple, handles: tuple = (), **kwargs):
    """A process that runs `target` ("module.function") with `args` (pickled until the rank's
    environment is set) and then `handles` (pipes: passed as multiprocessing passes them)."""
    return ctx.Process(target=_enter, args=(target, dict(os.environ), pickle.dumps(args), *handles), **kwargs)


def _enter(target: str, env: dict[str, str], payload: bytes, *handles) -> None:
    os.environ.clear()
    os.environ.update(env)
    module, _, name = target.rpartition(".")
    getattr(importlib.import_module(module), name)(*pickle.loads(payload), *handles)
