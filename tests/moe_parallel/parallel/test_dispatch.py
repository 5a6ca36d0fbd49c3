"""The attention rank's side of a layer's exchange, without peers: what it reads back to the host."""

from __future__ import annotations

import torch

from moe_parallel.parallel import dispatch
from moe_parallel.parallel.dispatch import CollectivePlane, RemoteExperts, Topology
from moe_parallel.runtime.syncs import HostSyncs


def test_dispatch_reads_only_the_split_sizes_back(monkeypatch):
    """On a GPU every read is a wait for the device: the split sizes (which size the exchange)
    are the one the attention rank cannot avoid; the counts per expert are a scatter-add, not a
    `bincount` (which reads the largest id back to size its output)."""
    posted = []
    monkeypatch.setattr(dispatch, "_post", lambda what, *a, **kw: posted.append((what, kw)) or (what, None))
    plane = CollectivePlane(Topology(1, 2, 8), hidden=16, dtype=torch.float32, device=torch.device("cpu"))
    x, weights = torch.randn(5, 16), torch.rand(5, 2)
    ids = torch.tensor([[0, 7], [3, 4], [1, 2], [6, 5], [0, 4]])
    with HostSyncs() as syncs:
        RemoteExperts(plane).start(3, 0, x, weights, ids)
    assert syncs.reads == ["tolist"]
    sends = [kw["input_split_sizes"] for what, kw in posted if kw.get("input_split_sizes") and sum(
        kw["input_split_sizes"])]
    assert sends == [[0, 5, 5]]  # experts 0-3 on expert rank 0, 4-7 on rank 1
