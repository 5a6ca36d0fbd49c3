"""Per-token timestamps of a traced request, for the per-hop table (`bench.hops`).

A request generated with `trace=True` gets a `trace` dict on each of its outputs: the
`time.monotonic()` second (CLOCK_MONOTONIC, one clock for every process of a host) at which
the piece passed each hop, in this order:

| stamp           | where                                                                  |
| --------------- | ---------------------------------------------------------------------- |
| `arrival`       | the engine accepted the request                                        |
| `scheduled`     | the engine's step loop began scheduling the step that made the token   |
| `dispatched`    | the step went to the executor (the batches are built)                  |
| `rank_start`    | the (slowest) attention rank had the batch                             |
| `rank_end`      | the rank had sampled the token                                         |
| `executed`      | the step's results were back in the engine                             |
| `queued`        | the token was detokenised and on the request's queue                   |
| `replica_yield` | the engine replica's streaming generator yielded it (Ray Serve)         |
| `ingress_recv`  | the ingress had it from the engine replica's stream                    |
| `ingress_send`  | the ingress handed its SSE frame to the HTTP server                    |

Only traced requests carry them (the ingress traces a request sent with the `X-MoE-Trace: 1`
header and copies the stamps into each SSE chunk as `moe_trace`); a step's stamps are taken
whatever the request, at the cost of a few clock reads.
"""

from __future__ import annotations

import time

HEADER = "x-moe-trace"
FIELD = "moe_trace"
STAMPS = ("arrival", "scheduled", "dispatched", "rank_start", "rank_end", "executed", "queued",
          "replica_yield", "ingress_recv", "ingress_send")


def stamp(trace: dict[str, float] | None, name: str) -> None:
    """Record `name` now on a traced output (no-op for untraced ones)."""
    if trace is not None:
        trace[name] = time.monotonic()
