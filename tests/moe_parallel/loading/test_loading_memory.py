"""Loading streams tensor by tensor: an expert rank's peak memory stays near its final size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_parallel.loading.tiny import tiny_config, write_checkpoint

ROOT = Path(__file__).resolve().parents[3]
MIB = 1024**2
SLACK = 24 * MIB  # allocator rounding, safetensors' header parsing, Python objects made while loading

# Loads experts 0-3 of every layer in a fresh process: the peak resident set (VmHWM, reset just
# before loading) minus the resident set before, against the bytes the rank ends up holding.
MEASURE = """
import json, sys, torch
from moe_parallel.loading.checkpoint import Checkpoint
from moe_parallel.model.config import ModelConfig
from moe_parallel.loading.loader import load_experts

def status():
    return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
            if k in ("VmRSS", "VmHWM")}

path = sys.argv[1]
c, ckpt = ModelConfig.from_dir(path), Checkpoint(path)
torch.zeros(1)  # warm the allocator
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident set
before = status()["VmRSS"]
groups = load_experts(ckpt, c, torch.float32, torch.device("cpu"), range(0, c.num_experts // 2))
peak = status()["VmHWM"]
final = sum(g.nbytes for g in groups)  # packed for the native kernels where they run
print(json.dumps({"before": before, "peak": peak, "final": final, "reads": len(ckpt.reads)}))
"""


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory) -> Path:
    """Experts large enough (128 MiB for half of them) that a second copy cannot hide in the slack."""
    config = tiny_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64)
    return write_checkpoint(tmp_path_factory.mktemp("big"), config, shards=2)


def test_expert_rank_peak_is_final_size_plus_one_tensor(big_experts):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(big_experts)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    largest = 512 * 1024 * 4  # one w1, w2 or w3 in float32
    assert m["reads"] == 4 * 4 * 3 and m["final"] == 4 * 4 * 3 * largest
    grew = m["peak"] - m["before"]
    assert grew <= m["final"] + largest + SLACK, (
        f"loading grew the resident set by {grew / MIB:.1f} MiB for {m['final'] / MIB:.1f} MiB of weights")
    assert grew >= m["final"] * 0.9  # the measurement sees the weights at all
