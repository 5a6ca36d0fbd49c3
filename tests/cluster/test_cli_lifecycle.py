"""`python -m cluster up / status / down` on loopback.

Runs before any other test starts Ray (files that use no Ray fixture run first, in name
order: tests/conftest.py), because `down` stops every Ray process on the machine, as
`ray stop` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from moe_parallel.parallel.launch import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_up_status_down():
    port = free_port()
    up = cli("up", "--port", str(port), "--num-cpus", "1")
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        status = cli("status", "--address", f"127.0.0.1:{port}")
        assert status.returncode == 0, status.stderr[-2000:]
        assert '"CPU": 1.0' in status.stdout
        assert "model instance" in status.stdout.lower() or "serve is not running" in status.stdout.lower()
    finally:
        down = cli("down")
    assert down.returncode == 0
    after = cli("status", "--address", f"127.0.0.1:{port}", timeout=60)
    assert after.returncode != 0 and "error:" in after.stderr and "Traceback" not in after.stderr
