"""The sparse MoE block: router gate, then an experts backend that may live elsewhere.

`SparseMoE` is what a decoder layer calls; where its experts run is the backend's business:
`LocalExperts` (same process, `single` layout) or `dispatch.RemoteExperts` (expert ranks,
`disaggregated` layout). Both hand back the same thing, the weighted sum of each token's
K expert outputs, computed by `combine`.

Shapes: x [T, D]; weights/ids [T, K]; routed rows N = T * K.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

from moe_parallel.config import ModelConfig
from moe_parallel.experts import ExpertGroup, expert_counts
from moe_parallel.linear import linear
from moe_parallel.packed import PackedExperts
from moe_parallel.profile import section
from moe_parallel.router import route


class ExpertsBackend(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...


class SparseMoE(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.k = layer, c.experts_per_token
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts: ExpertsBackend | None = None  # attached after loading; not part of the dense weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(self.layer, x, *self.route(x))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with section("router"):
            return route(linear(x, self.gate.weight), self.k)  # [T, K] each


def combine(y: torch.Tensor, weights: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum routed rows y [N, D] back into tokens, each scaled by its router weight [N]."""
    out = torch.zeros(num_tokens, y.shape[-1], dtype=y.dtype, device=y.device)
    return out.index_add_(0, token, (y * weights[:, None]).to(y.dtype))


def routed_tokens(num_tokens: int, k: int, device: torch.device) -> torch.Tensor:
    """The token of each routed row, for rows laid out [T, K] row-major: [N]."""
    return torch.arange(num_tokens, device=device).repeat_interleave(k)


class LocalExperts:
    """Every expert of every layer in this process. `tokens_per_expert` counts the routed rows of
    real tokens: a padded decode step sets `real_rows` ([T] 1 or 0, on the device, read by the
    CUDA graphs at every replay) so its padding rows are left out, and steps that are not
    traffic run `uncounted()`."""

    def __init__(self, groups: list[ExpertGroup]):
        self.groups = groups
        self.tokens_per_expert = torch.zeros(len(groups), groups[0].num_experts, dtype=torch.int64,
                                             device=groups[0].device)
        self.real_rows: torch.Tensor | None = None
        self.counting = True

    @contextmanager
    def uncounted(self):
        before, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = before

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t, k = ids.shape
        with section("experts"):
            if self.counting:
                real = None if self.real_rows is None else self.real_rows.repeat_interleave(k, output_size=t * k)
                self.tokens_per_expert[layer] += expert_counts(ids.flatten(), self.groups[layer].num_experts, real)
            group = self.groups[layer]
            if isinstance(group, PackedExperts):  # native kernels: the whole layer, sum included, in one call
                return group.fused(x, weights, ids)
            token = routed_tokens(t, k, x.device)
            y = group(x.index_select(0, token), ids.flatten())  # [N, D]
        with section("combine"):
            return combine(y, weights.flatten(), token, t)
