"""LoRA adapters over HTTP (`single`: the HTTP side is the subject; the disaggregated layout's
adapters are held to PEFT in tests/engine/test_lora.py, and its surviving streams carry one):
served models named by adapter, the same tokens as transformers + PEFT, adapters loaded and
unloaded at run time without disturbing the requests in flight, OpenAI-shaped errors,
per-adapter metrics."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.deployments.conftest import API_KEY, deploy, undeploy
from tests.lora_adapters import peft_greedy, write_adapter
from tests.reference import reference_greedy

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = [1, 5, 9, 33, 70]


@pytest.fixture(scope="module")
def adapters(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-adapters")
    return {"alpha": write_adapter(tiny_ckpt, root / "alpha", seed=1, rank=4),
            "beta": write_adapter(tiny_ckpt, root / "beta", seed=2, rank=8, targets=["q_proj", "v_proj"]),
            "too-big": write_adapter(tiny_ckpt, root / "too-big", seed=3, rank=32)}


@pytest.fixture(scope="module")
def url(serve_http, tiny_ckpt, adapters):
    args = {"model": str(tiny_ckpt), "served_model_name": "tiny", "layout": "single", "max_model_len": 256,
            "kv_cache_blocks": 64, "cpus_per_worker": 0.25,
            "api_key": API_KEY, "lora_modules": {"alpha": str(adapters["alpha"])}, "max_loras": 2,
            "max_lora_rank": 8, "enable_lora_loading": True}
    yield deploy(serve_http, "lora", args)
    undeploy("lora")


def tokens(url: str, model: str, max_tokens: int = 10, prompt=PROMPT) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "return_tokens_as_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def admin(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}_lora_adapter", json=body, headers=AUTH, timeout=60)


def test_adapters_are_models_with_their_base_as_parent(url):
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"]}
    assert cards["tiny"]["parent"] is None and cards["alpha"]["parent"] == "tiny"


def test_each_adapter_matches_peft_over_http(url, tiny_ckpt, adapters):
    assert tokens(url, "alpha") == peft_greedy(tiny_ckpt, adapters["alpha"], PROMPT, 10)
    assert tokens(url, "tiny") == reference_greedy(str(tiny_ckpt), PROMPT, 10)


def test_load_use_and_unload_while_a_stream_runs(url, tiny_ckpt, adapters):
    alone = tokens(url, "tiny", max_tokens=120)
    during: dict = {}
    thread = threading.Thread(target=lambda: during.setdefault("t", tokens(url, "tiny", max_tokens=120)))
    thread.start()
    time.sleep(0.3)
    r = admin(url, "load", {"lora_name": "beta", "lora_path": str(adapters["beta"])})
    assert r.status_code == 200 and "added successfully" in r.text
    assert tokens(url, "beta") == peft_greedy(tiny_ckpt, adapters["beta"], PROMPT, 10)
    assert admin(url, "unload", {"lora_name": "beta"}).status_code == 200
    thread.join(120)
    assert during["t"] == alone  # loading, serving and unloading an adapter did not disturb it
    gone = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "x"}, headers=AUTH, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("route", "body", "status", "message"), [
    ("load", {"lora_name": "big", "lora_path": "TOO_BIG"}, 400, "adapter rank 32 exceeds max_lora_rank=8"),
    ("load", {"lora_name": "nowhere", "lora_path": "/nonexistent"}, 400, "not a PEFT adapter directory"),
    ("load", {"lora_name": "alpha", "lora_path": "ALPHA"}, 400, "already loaded"),
    ("load", {"lora_name": "tiny", "lora_path": "ALPHA"}, 400, "base model's name"),
    ("load", {"lora_path": "ALPHA"}, 400, "lora_name"),
    ("unload", {"lora_name": "never-loaded"}, 404, "is not loaded"),
])
def test_bad_adapter_requests_get_openai_errors(url, adapters, route, body, status, message):
    body = {k: {"TOO_BIG": str(adapters["too-big"]), "ALPHA": str(adapters["alpha"])}.get(v, v)
            for k, v in body.items()}
    r = admin(url, route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_admin_routes_need_the_key(url, adapters):
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["beta"])},
                   timeout=30)
    assert r.status_code == 401


def test_metrics_count_requests_and_tokens_per_adapter(url):
    tokens(url, "alpha", max_tokens=3)
    time.sleep(2.5)  # the engine pushes its statistics once a second
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    requests = next(line for line in text.splitlines() if line.startswith('moe_serve:lora_requests_total{')
                    and 'lora_name="alpha"' in line)
    generated = next(line for line in text.splitlines() if line.startswith('moe_serve:lora_generation_tokens_total{')
                     and 'lora_name="alpha"' in line)
    assert float(requests.rsplit(" ", 1)[1]) >= 2 and float(generated.rsplit(" ", 1)[1]) >= 13
