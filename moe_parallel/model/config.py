"""Model configuration: `config.json` of a Mixtral checkpoint -> a frozen `ModelConfig`.

Only the fields the math needs are kept. Anything that would change the math in a way this
project does not implement (another architecture, scaled RoPE, a non-SiLU activation) is
refused here, at load time, with a message naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)


class CheckpointError(ValueError):
    """A checkpoint directory that this project cannot serve, with the reason."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face Hub model directory)")
        return cls.from_dict(json.loads(file.read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        _check_architecture(raw)
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        eos = raw.get("eos_token_id", 2)
        config = cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=int(raw["num_local_experts"]),
            experts_per_token=int(raw["num_experts_per_tok"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            sliding_window=raw.get("sliding_window"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        )
        config.validate()
        return config

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V that one token takes in the cache, every layer, at `itemsize` bytes a value."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok={self.experts_per_token} must be between 1 and "
                f"num_local_experts={self.num_experts}"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for rotary embeddings")


def _check_architecture(raw: dict) -> None:
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "mixtral" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        found = ", ".join(archs) or raw.get("model_type") or "unknown"
        raise CheckpointError(
            f"unsupported architecture {found!r}: this server runs {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(model_type 'mixtral') checkpoints"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {raw['hidden_act']!r}: Mixtral experts use 'silu'")


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"unsupported rope_type {rope_type!r}: only the default rotary embedding is implemented")
    return float(params.get("rope_theta", raw.get("rope_theta", 1e6)))
