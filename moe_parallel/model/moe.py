"""The sparse MoE block: the router, then an experts backend that may live elsewhere.

    weights, ids = top-k(softmax(gate(x)))       the k kept renormalised to sum to 1
    moe(x)[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])

`SparseMoE` is what a decoder layer calls; where its experts run is the backend's business:
`LocalExperts` (this process) or `parallel.dispatch.RemoteExperts` (the expert ranks). A
backend `start`s one micro-batch of a layer and hands back something to `wait()` on for the
weighted sum: a local backend computes at once, a remote one posts the exchange and returns,
so the decoder can attend another micro-batch meanwhile (`decoder.CausalLM.run`).

Shapes: x [T, D]; weights/ids [T, K]; routed rows N = T * K.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moe_parallel import native
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.experts import Experts, expert_counts
from moe_parallel.model.layers import linear
from moe_parallel.model.packed import PackedExperts
from moe_parallel.runtime.profile import timed


class Handle(Protocol):
    def wait(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Done:
    """A result that is already there."""

    value: torch.Tensor

    def wait(self) -> torch.Tensor:
        return self.value


class ExpertsBackend(Protocol):
    def start(self, layer: int, micro_batch: int, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> Handle: ...


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's top-k: softmax over the E experts, keep the k largest, renormalise.
    logits [T, E] -> weights [T, K] (float32), expert ids [T, K]."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, K]
    return weights / weights.sum(dim=-1, keepdim=True), ids


class SparseMoE(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.k = layer, c.experts_per_token
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts: ExpertsBackend | None = None  # attached after loading; not part of the dense weights

    def start(self, x: torch.Tensor, micro_batch: int = 0) -> Handle:
        return self.experts.start(self.layer, micro_batch, x, *self.route(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.start(x).wait()

    @timed("router")
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(linear(x, self.gate.weight), self.k)  # [T, K] each


@timed("combine")
def combine(y: torch.Tensor, weights: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum routed rows y [N, D] back into tokens, each scaled by its router weight [N] (on the CPU
    one native pass with the same roundings)."""
    if y.device.type == "cpu" and y.dtype in (torch.float32, torch.bfloat16) and native.available():
        return native.combine_rows(y, weights, token, num_tokens)
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

    def __init__(self, groups: list[Experts | PackedExperts]):
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

    def start(self, layer: int, micro_batch: int, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> Done:
        return Done(self(layer, x, weights, ids))

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t, k = ids.shape
        group = self.groups[layer]
        if self.counting:
            real = None if self.real_rows is None else self.real_rows.repeat_interleave(k, output_size=t * k)
            self.tokens_per_expert[layer] += expert_counts(ids.flatten(), group.num_experts, real)
        if isinstance(group, PackedExperts):  # native kernels: the whole layer, sum included, in one call
            return group.fused(x, weights, ids)
        token = routed_tokens(t, k, x.device)
        y = group(x.index_select(0, token), ids.flatten())  # [N, D]
        return combine(y, weights.flatten(), token, t)
