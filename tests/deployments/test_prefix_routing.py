"""Two engine replicas: requests that open alike go to the replica that cached their opening,
so every one after the first finds its prefix cached (with Serve's default random choice of
two, five in a row on the first one's replica would happen 1 time in 32)."""

from __future__ import annotations

import httpx

from tests.deployments.conftest import API_KEY, deploy, undeploy

MODEL = "tiny"


def test_same_opening_same_replica_cache_hits(serve_http, tiny_ckpt):
    args = {"model": str(tiny_ckpt), "served_model_name": MODEL, "layout": "single", "max_model_len": 256,
            "kv_cache_blocks": 64, "block_size": 8, "api_key": API_KEY}
    url = deploy(serve_http, "routed", args, engine_options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}})
    try:
        opening = "Shared instructions for every request in this test. " * 2
        cached = []
        for i in range(6):
            r = httpx.post(f"{url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": MODEL, "prompt": opening + f"question {i}", "max_tokens": 2})
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached[0] == 0 and all(c >= len(opening) - 8 for c in cached[1:]), cached
    finally:
        undeploy("routed")
