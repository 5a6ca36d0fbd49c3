"""Benchmark scripts that must keep working even though they are not run in full by the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_part_on_cpu_without_ray():
    """The GPU check's own logic, on tiny shapes on the CPU, with Ray made unimportable (the
    GPU image has no Ray): all six parts run and pass."""
    code = ("import sys, runpy; sys.modules['ray'] = None; "
            "sys.argv = ['gpu_check', '--smoke', '--batches', '1', '4']; "
            "runpy.run_module('bench.gpu_check', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    for part in ("(a) single", "(b) disaggregated", "(c) engine", "(d) decode", "(e) attention", "(f) start-up"):
        assert f"### {part}" in out.stdout
    assert "| float32 |" in out.stdout and "| bfloat16 |" in out.stdout and "| 4 |" in out.stdout
    assert out.stdout.rstrip().endswith("ALL CHECKS PASSED")


def _trace(step_start: float, rank_ms: float) -> dict:
    t = step_start
    out = {"arrival": 0.0, "scheduled": t, "dispatched": t + 0.001, "rank_start": t + 0.002}
    out["rank_end"] = out["rank_start"] + rank_ms / 1e3
    out["executed"] = out["rank_end"] + 0.001
    return out | {"queued": out["executed"] + 0.001, "replica_yield": out["executed"] + 0.002,
                  "ingress_recv": out["executed"] + 0.003, "ingress_send": out["executed"] + 0.004}


def test_hops_splits_each_tokens_wait_by_the_steps_in_between():
    """Two streams on steps 10 ms apart (3 ms from one step's end to the next's start): one
    decodes on every step, the other every second; each wait splits into the parts of the steps
    it spans."""
    from bench.hops import hop_means, itl_split, summary

    starts = [0.010 * k for k in range(6)]
    traces = [_trace(t, rank_ms=4.0) for t in starts]
    deliver = 0.005  # ingress_send -> client
    every = [(tr["ingress_send"] + deliver, tr) for tr in traces]
    skips = [(tr["ingress_send"] + deliver, tr) for tr in traces[::2]]
    row = {"streams": [every, skips], "starts": [0.0, 0.0], "tokens": 9, "elapsed": 0.06}
    split = itl_split(row)
    gaps = [0.010] * 5 + [0.020] * 2  # every: 5 one-step waits; skips: 2 two-step waits
    assert abs(split["sum"] - sum(gaps) / len(gaps)) < 1e-9
    assert abs(split["sum"] - summary(row)["itl_mean"]) < 1e-9  # same delivery for every token
    per_step = {"apply + event loop until the next step": 0.010 - 0.007, "schedule": 0.001, "to rank": 0.001,
                "rank step": 0.004, "from rank": 0.001}
    steps = sum(g / 0.010 for g in gaps) / len(gaps)
    for k, v in per_step.items():
        assert abs(split[k] - v * steps) < 1e-9, k
    assert abs(sum(per_step.values()) * steps - split["sum"]) < 1e-9
    hops = hop_means(row, first=False)
    assert abs(hops["ingress_send>client"] - deliver) < 1e-9 and abs(hops["rank_start>rank_end"] - 0.004) < 1e-9
