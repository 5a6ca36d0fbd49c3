"""Top-k routing of Mixtral: softmax over the E experts, keep the k largest, renormalise.

Shapes: logits [T, E] -> weights [T, K] (float32), expert ids [T, K].
"""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, K]
    return weights / weights.sum(dim=-1, keepdim=True), ids
