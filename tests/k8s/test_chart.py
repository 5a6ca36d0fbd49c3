"""The Helm chart rendered by Helm's own engine (helm-python-sdk), validated against KubeRay's
CRD (unknown fields are errors), Kubernetes' schemas, and Ray Serve's config schema."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import shared_path

CHART = Path(__file__).resolve().parents[2] / "k8s" / "moe-serve"

VALUE_SETS = {
    "default": {},
    "existing-claim-with-extras": {
        "model": {"source": "existingClaim", "existingClaim": "mixtral-weights"},
        "apiKey": {"secretName": "moe-api-key"},
        "ingress": {"enabled": True, "className": "nginx", "host": "llm.example.internal", "tlsSecretName": "llm-tls"},
        "podMonitor": {"enabled": True, "interval": "15s"},
        "grafanaDashboard": {"enabled": True, "folder": "LLM"},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        "rayAutoscaler": {"enabled": True, "idleTimeoutSeconds": 120},
    },
    "lora-adapters-int4": {
        "engine": {"quantization": "int4", "quantizeDense": True},
        "lora": {"existingClaim": "adapters", "modules": {"sql": "sql-lora", "chat": "chat-lora"}, "maxLoras": 2,
                 "enableLoading": True},
    },
    "new-claim-stock-ray": {
        "model": {"source": "newClaim", "newClaim": {"size": "300Gi", "storageClassName": "fast-rwx"},
                  "download": {"tokenSecret": {"name": "hf-token"}}},
        "stockRay": {"enabled": True},
    },
    "two-gpu-pools": {
        "engine": {"attentionWorkers": 2, "expertGroups": 8},
        "attentionWorkers": {"replicas": 2, "minReplicas": 2, "maxReplicas": 4,
                             "nodeSelector": {"gpu": "h100"},
                             "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "expertWorkers": {"replicas": 8, "minReplicas": 8, "maxReplicas": 8, "nodeSelector": {"gpu": "l40s"},
                          "image": "moe-serve:0.1.0-experts"},
    },
    "laptop-cpu": {
        "model": {"source": "existingClaim", "existingClaim": "tiny", "dir": "tiny-mixtral",
                  "servedModelName": "tiny-mixtral"},
        "engine": {"expertGroups": 2, "dtype": "float32", "accelerator": "cpu", "cpusPerWorker": 0.25,
                   "maxModelLen": 2048, "kvCacheBlocks": 512},
        "head": {"resources": {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}}},
        "attentionWorkers": {"gpusPerPod": 0, "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                                             "limits": {"cpu": "2", "memory": "4Gi"}}},
        "expertWorkers": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpusPerPod": 0,
                          "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                        "limits": {"cpu": "2", "memory": "4Gi"}}},
        "serve": {"autoscaling": {"minReplicas": 1, "maxReplicas": 1}},
    },
}


def render(values: dict) -> list[dict]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values=values, name="moe", namespace="ml")
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def strict(schema):
    """The CRD's schema with unknown fields made errors (the CRD itself lets them through)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    import jsonschema

    crd = yaml.safe_load(shared_path("k8s", "crds", "ray.io_rayservices.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict(schema))


@pytest.mark.parametrize("name", VALUE_SETS)
def test_values_render_lint_and_validate(name, rayservice_validator):
    import helm_python as helm
    import kubernetes_validate

    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values)
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 3], report
    docs = render(values)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayService") == 1
    for doc in docs:
        if doc["kind"] == "RayService":
            errors = sorted(rayservice_validator.iter_errors(doc), key=str)
            assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
        elif doc["kind"] == "PodMonitor":  # a Prometheus-operator CRD, not a built-in kind
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
        else:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
    extras = VALUE_SETS["existing-claim-with-extras"]
    if values is extras:
        assert {"Ingress", "PodMonitor", "PodDisruptionBudget", "ConfigMap"} <= set(kinds)


def rayservice(values: dict) -> dict:
    return next(d for d in render(values) if d["kind"] == "RayService")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_serve_config_is_a_ray_serve_config_of_this_project(name):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(rayservice(VALUE_SETS[name])["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(raw)
    app = config.applications[0]
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    from deployments.config import AppArgs

    assert set(app.args) <= set(AppArgs.model_fields)  # every arg is one the app knows
    engine = next(d for d in app.deployments if d.name == "MoEEngine")
    assert engine.autoscaling_config["min_replicas"] >= 0 and engine.max_ongoing_requests >= 1
    assert engine.max_queued_requests >= 1


def test_kuberay_conventions_and_secure_defaults():
    spec = rayservice(VALUE_SETS["two-gpu-pools"])["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"attention-workers", "expert-workers"}
    for g in [cluster["headGroupSpec"], *groups.values()]:
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        pod = g["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    experts = groups["expert-workers"]["template"]["spec"]
    assert experts["nodeSelector"] == {"gpu": "l40s"}
    assert experts["containers"][0]["image"] == "moe-serve:0.1.0-experts"
    assert experts["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert groups["attention-workers"]["template"]["spec"]["tolerations"][0]["key"] == "gpu"
    assert "attention_workers" in groups["attention-workers"]["rayStartParams"]["resources"]


def test_api_key_comes_from_the_secret():
    spec = rayservice(VALUE_SETS["existing-claim-with-extras"])["spec"]
    env = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    key = next(e for e in env if e["name"] == "MOE_SERVE_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "moe-api-key", "key": "api-key"}


def test_every_pod_starts_ray_with_serves_switches():
    """The proxy reads them at start-up, so they go on every container (cluster/serve_env.py)."""
    from cluster.serve_env import SERVE_ENV

    spec = rayservice(VALUE_SETS["two-gpu-pools"])["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + list(spec["workerGroupSpecs"])
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV


@pytest.mark.parametrize(("values", "message"), [
    ({"bogus": 1}, "additional properties 'bogus' not allowed"),
    ({"attentionWorkers": {"replicas": -1}}, "/attentionWorkers/replicas': minimum: got -1, want 0"),
    ({"engine": {"maxNumSeqs": "lots"}}, "/engine/maxNumSeqs': got string, want integer"),
    ({"engine": {"expertGroups": 3}}, "engine.expertGroups (3) must divide model.numExperts (8)"),
    ({"model": {"source": "existingClaim"}}, "model.existingClaim must name a PersistentVolumeClaim"),
    ({"expertWorkers": {"minReplicas": 9}}, "expertWorkers.minReplicas (9) must not exceed expertWorkers.maxReplicas"),
])
def test_bad_values_are_rejected_readably(values, message):
    import helm_python as helm

    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert message in str(err.value)


def exported_metrics() -> set[str]:
    """Every series name /metrics can carry (histograms with their _bucket, _sum and _count),
    from the server's own renderer fed a replica's statistics with every family populated."""
    from deployments.metrics import render as render_metrics
    from engine.stats import EngineStats

    s = EngineStats()
    s.requests_finished, s.lora_requests, s.lora_tokens, s.tokens_per_expert = {"stop": 1}, {"a": 1}, {"a": 2}, [[1]]
    names = set()
    for line in render_metrics(s, "m", {"layout": "single"}).splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
    return names


def test_grafana_dashboard_queries_only_metrics_the_server_exports():
    """The dashboard ships as a ConfigMap with the sidecar's label; every panel has a query, and
    every metric a query names is one the server's /metrics exports."""
    import json
    import re

    cm = next(d for d in render({"grafanaDashboard": {"enabled": True, "folder": "LLM"}})
              if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "LLM"
    dashboard = json.loads(cm["data"]["moe-serve.json"])
    assert dashboard["panels"] and dashboard["uid"] == "moe-serve"
    exported = exported_metrics()
    named = set()
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            found = set(re.findall(r"moe_serve:[a-zA-Z0-9_]+", expr))
            assert found, (panel["title"], expr)
            assert found <= exported, (panel["title"], found - exported)
            named |= found
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    assert all(set(re.findall(r"moe_serve:[a-zA-Z0-9_]+", v)) <= exported for v in variables)
    # the load picture no peer's dashboard has, and the serving basics
    assert {"moe_serve:expert_tokens_total", "moe_serve:time_to_first_token_seconds_bucket",
            "moe_serve:inter_token_latency_seconds_bucket", "moe_serve:kv_cache_usage_perc",
            "moe_serve:prefix_cache_hits_total", "moe_serve:lora_requests_total"} <= named
    assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard") for d in render({}))
