"""A quantized model served over HTTP says what it serves: /v1/models and the metrics."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.deployments.conftest import deploy, undeploy


@pytest.fixture(scope="module")
def url(serve_http, tiny_ckpt):
    args = {"model": str(tiny_ckpt), "served_model_name": "tiny-int8", "layout": "single", "max_model_len": 256,
            "kv_cache_blocks": 64, "quantization": "int8", "quantize_dense": True}
    yield deploy(serve_http, "quantized", args)
    undeploy("quantized")


def test_models_and_metrics_name_the_quantization(url):
    card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == "tiny-int8" and card["quantization"] == "int8"
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-int8", "prompt": "hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    time.sleep(2.5)  # the engine pushes its statistics once a second
    info = next(line for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
                if line.startswith("moe_serve:model_info{"))
    assert 'quantization="int8"' in info and 'quantize_dense="true"' in info and 'layout="single"' in info


def test_bad_quantization_args_are_refused_before_anything_starts(tiny_ckpt):
    from deployments.config import parse_args

    base = {"model": str(tiny_ckpt), "accelerator": "cpu", "max_model_len": 256}
    with pytest.raises(ValueError, match="quantize_dense needs quantization int8 or int4"):
        parse_args(base | {"quantize_dense": True})
    with pytest.raises(ValueError, match="quantization: Input should be 'auto', 'none', 'int8' or 'int4'"):
        parse_args(base | {"quantization": "fp4"})
    with pytest.raises(ValueError, match="group_size=128 does not divide the model's hidden_size=64"):
        parse_args(base | {"quantization": "int4"})
