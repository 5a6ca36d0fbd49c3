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
