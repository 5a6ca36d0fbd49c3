"""A rank's loading is told as it goes: a first line with the part's size, progress lines with a
rate and the time left (bounded in number however many tensors there are), and a last line."""

from __future__ import annotations

import logging
import re

import torch

from moe_parallel.loading import progress
from moe_parallel.loading.checkpoint import Checkpoint
from moe_parallel.loading.loader import load_dense, load_experts
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.names import dense_shapes, expert_shapes


def test_loading_logs_progress_with_a_bounded_count(tiny_ckpt, caplog, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # every STEP of the bytes, however fast the disk
    monkeypatch.setattr(progress, "STEP", 0.2)  # at most 5 lines: fewer than the tiny model has tensors
    reports: list[tuple[str, int, int]] = []
    monkeypatch.setattr(progress, "reporter", lambda part, done, total: reports.append((part, done, total)))
    c = ModelConfig.from_dir(tiny_ckpt)
    ckpt = Checkpoint(tiny_ckpt)
    with caplog.at_level(logging.INFO, logger="moe_parallel.loading"):
        load_dense(ckpt, c, torch.float32, torch.device("cpu"))
        load_experts(ckpt, c, torch.float32, torch.device("cpu"), range(0, 4))
    lines = [r.getMessage() for r in caplog.records if r.name == "moe_parallel.loading"]
    experts = expert_shapes(c, range(0, 4))
    for what, names in (("dense weights", dense_shapes(c)), ("experts 0-3", experts)):
        mine = [m for m in lines if m.startswith(f"loading {what}") or m.startswith(f"loaded {what}")]
        total = ckpt.nbytes(list(names))
        assert total > 0 and mine[0].startswith(f"loading {what}: {len(names)} tensors")
        assert re.match(rf"loaded {what}: {len(names)} tensors, .* in [0-9.]+ s \(.*/s\)$", mine[-1]), mine[-1]
        steps = mine[1:-1]
        assert len(names) > 1 / progress.STEP + 2  # more tensors than the lines allowed: the bound is tested
        assert 1 <= len(steps) <= 1 / progress.STEP, steps
        assert all(re.search(r"\d+/\d+ tensors, .* \(\d+%\), .*/s, about \d+ s left$", m) for m in steps), steps
    assert len(ckpt.reads) == len(dense_shapes(c)) + len(experts)  # counting read nothing twice
    # the same moments go to the reporter (what /health shows): start, each line, end
    for what, names in (("dense weights", dense_shapes(c)), ("experts 0-3", experts)):
        mine = [(d, t) for part, d, t in reports if part == what]
        total = ckpt.nbytes(list(names))
        assert mine[0] == (0, total) and mine[-1] == (total, total)
        assert len(mine) == len([m for m in lines if what in m])
        assert [d for d, _ in mine] == sorted(d for d, _ in mine)
