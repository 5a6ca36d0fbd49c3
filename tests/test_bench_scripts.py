"""Benchmark scripts that must keep working even though they are not run in full by the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke_runs_on_cpu_without_ray_or_deepspeed():
    code = ("import sys, runpy; sys.modules['ray'] = None; sys.modules['deepspeed'] = None; "
            "sys.argv = ['gpu_single', '--smoke', '--batches', '1', '4']; "
            "runpy.run_module('bench.gpu_single', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 1 |" in out.stdout and "| 4 |" in out.stdout and "of bandwidth" in out.stdout
