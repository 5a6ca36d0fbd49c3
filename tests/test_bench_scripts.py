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
