"""The API is served by the ingress replica itself (Serve's direct ingress, cluster/serve_env.py),
as `make serve` starts the cluster: no proxy process between the client and the ingress."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import psutil

from tests.conftest import ingress_ports
from tests.deployments.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _listener(port: int) -> psutil.Process:
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    raise AssertionError(f"nothing listens on {port}")


def test_the_ingress_replica_listens_on_the_api_port(shared_url):
    port = urlsplit(shared_url).port
    assert port in ingress_ports()
    title = " ".join(_listener(port).cmdline())
    assert "OpenAIIngress" in title and "ProxyActor" not in title, title


def test_a_stream_and_serves_health_probes_on_it(shared_url):
    base = f"http://127.0.0.1:{urlsplit(shared_url).port}"
    assert httpx.get(f"{base}/-/healthz", timeout=10).status_code == 200  # what KubeRay probes on a pod
    with httpx.stream("POST", f"{shared_url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": True,
                            "ignore_eos": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]" and len(frames) >= 6  # one frame per token, then [DONE]


def test_another_app_prefix_is_not_found_there(shared_url):
    base = f"http://127.0.0.1:{urlsplit(shared_url).port}"
    r = httpx.get(f"{base}/not-an-app/v1/models", headers=AUTH, timeout=10)
    assert r.status_code == 404
