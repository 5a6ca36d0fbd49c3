"""The environment every Ray process of a serving cluster starts with: Ray Serve's own switches.

- `RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`, `RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`: a
  deployment's code and its handles' router on the replica's event loop, not on threads of their
  own, so a streamed item crosses no thread. Both deployments only await (blocking work is in
  `asyncio.to_thread` or on the engine's step thread), so nothing starves a replica's loop.
- `RAY_SERVE_USE_GRPC_BY_DEFAULT=1`: calls from the ingress to the engine replicas (and from the
  proxy to the ingress) go over Serve's gRPC transport instead of one Ray object per streamed item.
- **Direct ingress** (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1`): each ingress replica serves HTTP
  itself on a port of its host, so a token crosses no proxy. Its ports start at `API_PORT`
  (8000): the first app's ingress on a host takes it, further apps or replicas on that host
  take the next ones. A port goes back to the pool as soon as its replica is gone
  (`RAY_SERVE_PORT_QUARANTINE_S=0`), so an ingress replica that Serve restarts serves on the
  same port again. An ingress replica that stops still finishes its requests but waits for no
  load balancer to notice (`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2`, Serve's 30 s
  default is for one in front of the replicas; here the clients connect to the port itself,
  and an idle replica held each stop for 31 s: every app deleted in the tests).
  Serve's own proxy still runs on the head node, on `http_options.port`
  (`PROXY_PORT` in serve_config.yaml: every app under its route prefix), and serves the API
  there for a cluster started without these switches.

Each was kept for what `python -m bench.hops` measured (README, "The served path"). Every process
reads them when it starts, the proxy and Serve's controller (which hands out the ports) included,
so `make serve`, `python -m cluster up`, the Helm chart and the tests start the cluster with them;
the replicas also get the first three through their actor options (`deployments.app`,
`REPLICA_ENV`), for a cluster started without them.
"""

from __future__ import annotations

import contextlib
import os
import time

API_PORT = 8000  # the first ingress replica's own HTTP port on each host: the API
PROXY_PORT = 8500  # Serve's proxy (serve_config.yaml's http_options.port)
PORTS = 100  # direct-ingress ports per host, from API_PORT

REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
               "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}
SERVE_ENV = REPLICA_ENV | {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(API_PORT),
                           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(API_PORT + PORTS),
                           "RAY_SERVE_PORT_QUARANTINE_S": "0",
                           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


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


def direct_ingress_ports(env: dict | None = None) -> range | None:
    """The ports ingress replicas serve on in a cluster started with `env` (SERVE_ENV where it
    does not say), or None where direct ingress is off."""
    env = SERVE_ENV | dict(env or {})
    if env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] != "1":
        return None
    return range(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]))


def _prefix(route_prefix: str) -> str:
    return "" if route_prefix in ("", "/") else "/" + route_prefix.strip("/")


def find_ingress(route_prefix: str, host: str = "127.0.0.1", ports: range | None = None,
                 timeout_s: float = 60.0) -> str:
    """The base URL (`http://host:port/prefix`) of an ingress replica that serves the app under
    `route_prefix` directly: the first port of the range whose server answers the app's
    `/health` (an ingress of another app answers 404)."""
    import httpx

    ports = ports if ports is not None else direct_ingress_ports()
    if not ports:
        raise RuntimeError("direct ingress is off in this cluster")
    prefix = _prefix(route_prefix)
    deadline = time.monotonic() + timeout_s
    while True:
        for port in ports:
            url = f"http://{host}:{port}{prefix}"
            try:
                r = httpx.get(f"{url}/health", timeout=2)
            except httpx.HTTPError:
                continue
            if r.status_code in (200, 503) and r.headers.get("content-type", "").startswith("application/json"):
                return url
        if time.monotonic() > deadline:
            raise TimeoutError(f"no ingress replica serves {route_prefix or '/'} "
                               f"on {host}:{ports.start}-{ports.stop - 1}")
        time.sleep(0.5)


def api_url(proxy_url: str, route_prefix: str = "/", host: str = "127.0.0.1") -> str:
    """Where a cluster this process started (under `applied()`, with its environment as it is
    now) serves the app under `route_prefix`: its ingress replica's own port with direct
    ingress on, else Serve's proxy at `proxy_url`."""
    ports = direct_ingress_ports(os.environ)
    if ports:
        return find_ingress(route_prefix, host, ports)
    return proxy_url.rstrip("/") + _prefix(route_prefix)
