"""The metrics hub's view of the app's health: loading (the fraction of the weights in) until
an engine replica is up, then ready."""

from __future__ import annotations

from deployments import metrics
from deployments.metrics import MetricsHub
from engine.stats import EngineStats


def test_health_is_the_loaded_fraction_until_a_replica_is_ready(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    hub = MetricsHub.func_or_class("tiny")
    assert hub.health() == {"ready": False, "loading": 0.0}
    hub.loading("r1/0/dense weights", 50, 100)
    hub.loading("r1/1/experts 0-3", 0, 300)
    assert hub.health() == {"ready": False, "loading": 0.125}
    hub.loading("r1/1/experts 0-3", 300, 300)  # a part's later report replaces its earlier one
    assert hub.health() == {"ready": False, "loading": 0.875}
    hub.ready("r1")
    assert hub.health() == {"ready": True}
    clock[0] += metrics.GAUGE_TTL_S - 1
    hub.report("r1", EngineStats())  # an idle replica still pushes its statistics every second
    clock[0] += metrics.GAUGE_TTL_S - 1
    assert hub.health() == {"ready": True}
    clock[0] += 2  # nothing from it for longer than the TTL: gone, and its replacement loads
    hub.loading("r2/0/dense weights", 10, 100)
    assert hub.health() == {"ready": False, "loading": 0.1}  # the ready replica's parts are done with


def test_the_health_route_answers_503_with_the_fraction_until_the_hub_says_ready():
    """The ingress's GET /health, on the hub's answer (a stand-in for the hub's handle)."""
    import asyncio
    import json

    from deployments.ingress import OpenAIRoutes

    class Handle:  # hub.health.remote() -> an awaitable answer, as a Serve handle gives
        def __init__(self, hub):
            self.health = self
            self.hub = hub

        def remote(self):
            async def answer():
                return self.hub.health()

            return answer()

    hub = MetricsHub.func_or_class("tiny")
    routes = OpenAIRoutes.__new__(OpenAIRoutes)  # only what /health reads
    routes.hub = Handle(hub)
    hub.loading("r1/0/dense weights", 25, 100)
    loading = asyncio.run(OpenAIRoutes.health(routes))
    assert loading.status_code == 503 and json.loads(loading.body) == {"status": "loading", "loading": 0.25}
    hub.ready("r1")
    ok = asyncio.run(OpenAIRoutes.health(routes))
    assert ok.status_code == 200 and json.loads(ok.body) == {"status": "ok"}
    routes.hub = None  # no hub to ask: not ready either, and no stack trace
    gone = asyncio.run(OpenAIRoutes.health(routes))
    assert gone.status_code == 503 and json.loads(gone.body) == {"status": "unavailable"}
