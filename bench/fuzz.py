"""The suite's fuzz test, longer: `FUZZ_REQUESTS` hypothesis-generated requests (5,000 here,
300 in `make test`) against a live app, every answer checked, the KV pool whole afterwards.

    python -m bench.fuzz [--requests 5000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args(argv)
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "tests/deployments/test_hardening.py", "-k", "fuzzed"]
    env = os.environ | {"MOE_SERVE_FUZZ_REQUESTS": str(args.requests)}
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
