"""The environment every Ray process of a serving cluster starts with: Ray Serve's own switches.

- `RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`, `RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`: a
  deployment's code and its handles' router on the replica's event loop, not on threads of their
  own, so a streamed item crosses no thread. Both deployments only await (blocking work is in
  `asyncio.to_thread` or on the engine's step thread), so nothing starves a replica's loop.
- `RAY_SERVE_USE_GRPC_BY_DEFAULT=1`: calls from the proxy to the ingress and from the ingress to
  the engine replicas go over Serve's gRPC transport instead of one Ray object per streamed item.

Each was kept for what `python -m bench.hops` measured (README, "The served path"). Every process
reads them when it starts, the proxy included, so `make serve`, `python -m cluster up`, the Helm
chart and the tests start the cluster with them; the replicas also get them through their
actor options (`deployments.app`), for a cluster started without them.
"""

from __future__ import annotations

import contextlib
import os

SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
             "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


@contextlib.contextmanager
def applied():
    """SERVE_ENV in this process's environment (values already set there win) while the block
    starts Ray (`ray.init` hands its environment to the processes it starts), then as it was:
    this process's own Serve handles keep Serve's defaults (a handle whose router shares the
    caller's event loop needs one, which a plain script or test does not run)."""
    saved = {name: os.environ.get(name) for name in SERVE_ENV}
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
