"""Rotary position embedding (the default RoPE of Mixtral, no scaling).

Shapes: positions [T]; cos/sin [T, Dh]; q/k [T, H, Dh].
The angles are computed in float32 from the integer positions and cast to the model dtype,
exactly as the reference does, so a token's rotation does not depend on the batch it is in.
"""

from __future__ import annotations

import torch


class Rotary:
    def __init__(self, head_dim: int, theta: float, device: torch.device):
        steps = torch.arange(0, head_dim, 2, dtype=torch.float, device=device)
        self.inv_freq = 1.0 / (theta ** (steps / head_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
