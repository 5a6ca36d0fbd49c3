"""A Serve instance on loopback and helpers to deploy the app on it."""

from __future__ import annotations

import time

import httpx
import pytest

from moe_parallel.parallel.launch import free_port

API_KEY = "sk-test-key"


@pytest.fixture(scope="session")
def serve_http(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


SHARED = "shared"  # the app test_openai and test_real_clients share


@pytest.fixture(scope="session")
def shared_url(serve_http, tiny_ckpt):
    """One app for the modules whose tests leave it as they found it (test_openai,
    test_real_clients): an app takes 15-20 s to start here. `disaggregated` (1 attention + 2
    expert actors), a 2,048-token context for the clients' long prompts, blocks of 16."""
    args = {"model": str(tiny_ckpt), "served_model_name": "tiny", "layout": "disaggregated", "attention_workers": 1,
            "expert_groups": 2, "max_model_len": 2048, "kv_cache_blocks": 1024, "block_size": 16,
            "cpus_per_worker": 0.25, "api_key": API_KEY}
    from tests.conftest import release, release_early

    url = deploy(serve_http, SHARED, args)
    release_early("shared_url", lambda: undeploy(SHARED))
    yield url
    release("shared_url")


def deploy(base: str, name: str, args: dict, engine_options: dict | None = None) -> str:
    """Run the app under /name and wait until it answers through Serve's proxy (`base`);
    returns its base URL on its ingress replica's own port (direct ingress, as `make serve`
    serves the API)."""
    from ray import serve

    from cluster.serve_env import find_ingress
    from deployments.app import make_app
    from tests.conftest import ingress_ports

    serve.run(make_app(args, engine_options), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{base}/{name}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return find_ingress(f"/{name}", ports=ingress_ports())
            # before the model is up: only a route Serve does not have yet, or the app saying so
            assert r.status_code == 404 or (r.status_code == 503 and r.json()["status"] in ("loading", "unavailable")
                                            and 0.0 <= r.json().get("loading", 0.0) <= 1.0), (r.status_code, r.text)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"app {name} did not come up")


def undeploy(name: str) -> None:
    from ray import serve

    serve.delete(name)


def engine_handle(name: str):
    from ray import serve

    return serve.get_deployment_handle("MoEEngine", app_name=name)
