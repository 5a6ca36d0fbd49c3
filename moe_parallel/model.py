"""The Mixtral decoder, written as the math; where the experts run is plugged in.

    h = x + attention(norm(x));  x = h + moe(norm(h))      per layer
    logits = lm_head(norm(x))

Module names follow the Hub checkpoint's tensor names, so the dense weights load by name.
The model is built on the meta device and the loaded tensors are assigned in place, so no
memory or time goes to random initialisation.

Shapes: T tokens in the step, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_parallel.attention import Attention, AttentionMetadata
from moe_parallel.config import CheckpointError, ModelConfig
from moe_parallel.kv_cache import KVCache
from moe_parallel.linear import linear
from moe_parallel.moe import SparseMoE
from moe_parallel.norm import RMSNorm
from moe_parallel.profile import section


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.block_sparse_moe: nn.Module = SparseMoE(c, layer)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        with section("norm"):
            normed = self.input_layernorm(x)
        with section("attention"):
            h = x + self.self_attn(normed, meta, cache)
        with section("norm"):
            normed = self.post_attention_layernorm(h)
        return h + self.block_sparse_moe(normed)


class Decoder(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    @classmethod
    def from_dense_weights(cls, c: ModelConfig, weights: dict[str, torch.Tensor]) -> CausalLM:
        with torch.device("meta"):
            model = cls(c)
        if c.tie_word_embeddings:
            weights = weights | {"lm_head.weight": weights["model.embed_tokens.weight"]}
        model.load_state_dict(weights, strict=False, assign=True)
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise CheckpointError(f"tensor {left[0]!r} was not loaded")
        model.requires_grad_(False).eval()
        for layer in model.model.layers:
            layer.self_attn.fuse()
        return model

    def forward(self, token_ids: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        """Run the step's tokens [T] through every layer; returns the final-norm hidden [T, D]."""
        with section("embedding"):
            x = self.model.embed_tokens(token_ids)  # [T, D]
        for layer in self.model.layers:
            x = layer(x, meta, cache)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head.weight)
