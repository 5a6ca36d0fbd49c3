"""The engine's serving statistics, kept as plain numbers that merge across replicas.

Latencies follow vLLM's meanings: time to first token (arrival -> first token out),
inter-token latency (between two tokens of one completion), end-to-end latency (arrival ->
finish). Histograms keep cumulative bucket counts, so snapshots from several replicas add up.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # last: +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total


@dataclass
class EngineStats:
    time_to_first_token: Histogram = field(default_factory=Histogram)
    inter_token_latency: Histogram = field(default_factory=Histogram)
    e2e_latency: Histogram = field(default_factory=Histogram)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, found cached
    # gauges: filled in when a snapshot is taken
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # [layer][expert], cumulative
    lora_requests: dict[str, int] = field(default_factory=dict)  # by adapter name
    lora_tokens: dict[str, int] = field(default_factory=dict)  # generated, by adapter name
