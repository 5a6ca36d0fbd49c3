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


def test_plots_are_drawn_from_the_tables_beside_them(tmp_path):
    """bench.plots reads the result tables as written and draws each picture it has a table
    for (and skips the others)."""
    from bench import plots

    (tmp_path / "peers_http.md").write_text(
        "intro\n\n| streams | ours tok/s | vLLM tok/s | ours TTFT p50 (ms) | vLLM TTFT p50 (ms) | ours ITL p50 (ms) "
        "| vLLM ITL p50 (ms) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        "| 1 | 63.3 | 99.1 | 47 | 37 | 14.7 | 8.3 |\n| 32 | 548.4 | 879.5 | 440 | 338 | 49.8 | 31.2 |\n")
    (tmp_path / "moe_kernels_float32.md").write_text(
        "| tokens | torch ms | native ms | vLLM ms | speedup |\n| ---: | ---: | ---: | ---: | ---: |\n"
        "| 1 | 1.4 | 0.47 | 0.49 | 2.98x |\n| 16 | 8.5 | 1.49 | 1.71 | 5.70x |\n")
    [(header, rows)] = plots.tables(tmp_path / "peers_http.md")
    assert header[0] == "streams" and [r[0] for r in rows] == ["1", "32"]
    assert plots.main(["--results", str(tmp_path)]) == 0
    for name in ("peers_http.png", "moe_kernels.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "layouts.png").exists()  # no suite table, no picture
