"""A quantized model served over HTTP says what it serves (/v1/models and the metrics), and
traces its requests to an OTLP collector (one in this process, reading what the app sends)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from moe_parallel.parallel.launch import free_port
from tests.deployments.conftest import deploy, undeploy


class Collector:
    """An OTLP/HTTP trace receiver in memory: every span the app exports, decoded."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[dict] = []
        spans, lock = self.spans, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    for rs in request.resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                attrs = {a.key: (a.value.string_value or a.value.int_value) for a in sp.attributes}
                                spans.append({"name": sp.name, "trace": sp.trace_id.hex(), "id": sp.span_id.hex(),
                                              "parent": sp.parent_span_id.hex(), "service": service,
                                              "scope": ss.scope.name, "attrs": attrs, "start": sp.start_time_unix_nano,
                                              "end": sp.end_time_unix_nano})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, rid: str, names: set[str], timeout_s: float = 20.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            mine = [s for s in list(self.spans) if str(s["attrs"].get("moe_serve.request_id", "")).startswith(rid)]
            ids = {s["id"] for s in mine}
            mine += [s for s in list(self.spans) if s["parent"] in ids and s not in mine]
            found = {s["name"]: s for s in mine}
            if names <= set(found):
                return found
            time.sleep(0.2)
        raise AssertionError(f"spans of {rid}: {sorted(found)} (wanted {sorted(names)})")


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def url(serve_http, tiny_ckpt, collector):
    args = {"model": str(tiny_ckpt), "served_model_name": "tiny-int8", "layout": "single", "max_model_len": 256,
            "kv_cache_blocks": 64, "quantization": "int8", "quantize_dense": True,
            "otlp_traces_endpoint": collector.url}
    yield deploy(serve_http, "quantized", args)
    undeploy("quantized")


def test_models_and_metrics_name_the_quantization(url):
    card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == "tiny-int8" and card["quantization"] == "int8"
    body = {"model": "tiny-int8", "prompt": "hi", "max_tokens": 4, "ignore_eos": True}  # sampled: EOS may come early
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
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


SPANS = {"moe-serve.request", "engine.generate", "engine.queue_and_prefill", "engine.decode"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_is_traced_ingress_to_engine_under_the_callers_trace(url, collector, stream):
    """ingress span (the caller's traceparent its parent) -> the engine replica's generate span
    -> its queue-and-prefill and decode spans; the request id as in the response and the log."""
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = {"model": "tiny-int8", "prompt": "trace me", "max_tokens": 5, "ignore_eos": True, "stream": stream}
    headers = {"traceparent": f"00-{caller_trace}-{caller_span}-01"}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200
    if stream:
        frames = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        rid = frames[0]["id"]
    else:
        rid = r.json()["id"]
    spans = collector.of(rid, SPANS)
    request, generate = spans["moe-serve.request"], spans["engine.generate"]
    assert {s["trace"] for s in spans.values()} == {caller_trace}
    assert request["parent"] == caller_span and generate["parent"] == request["id"]
    assert spans["engine.queue_and_prefill"]["parent"] == spans["engine.decode"]["parent"] == generate["id"]
    assert request["attrs"]["moe_serve.request_id"] == rid and generate["attrs"]["moe_serve.request_id"] == f"{rid}-0"
    assert request["attrs"]["http.response.status_code"] == 200 and request["attrs"]["gen_ai.usage.output_tokens"] == 5
    assert generate["attrs"]["gen_ai.usage.output_tokens"] == 5
    assert request["start"] <= generate["start"] <= spans["engine.decode"]["start"] <= generate["end"] <= request["end"]
    assert {s["service"] for s in spans.values()} == {"moe-serve"}
