"""Write a small deterministic Mixtral checkpoint in the Hub layout, with a tokenizer.

    python -m moe_parallel.loading.tiny OUT_DIR [--force]

The weights are random (seeded) and scaled so activations stay near unit size, which makes
greedy decoding decisive (no near-ties) and parity tests meaningful. The tokenizer is
byte-level (every UTF-8 byte is a token, plus <unk>, <s>, </s>) and carries Mixtral's
`[INST]` chat template, so the embedded model exercises the same code paths as a real one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_parallel.model.config import ModelConfig
from moe_parallel.model.names import all_shapes

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_VOCAB = len(SPECIAL_TOKENS) + 256

MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def tiny_config(**overrides) -> dict:
    """The raw `config.json` of the tiny model; keyword arguments override fields."""
    raw = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": BYTE_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    raw.update(overrides)
    return raw


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in all_shapes(config).items():
        if len(shape) == 1:  # norm weights: near one
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            weights[name] = torch.randn(shape, generator=gen)
        else:  # fan-in scaling keeps every projection's output near unit size
            weights[name] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    return weights


def write_checkpoint(out: str | Path, raw_config: dict | None = None, seed: int = 0, shards: int = 1) -> Path:
    """Write config, weights (split over `shards` files when > 1) and tokenizer to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw_config = raw_config or tiny_config()
    weights = random_weights(ModelConfig.from_dict(raw_config), seed)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    _write_weights(out, weights, shards)
    write_tokenizer(out, raw_config)
    return out


def _write_weights(out: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(weights)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(out: Path, raw_config: dict) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab |= {ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)}
    # a model with a larger vocabulary (the benchmark model) gets placeholder tokens, so every
    # id it can produce decodes to something
    vocab |= {f"<unused{i}>": i for i in range(BYTE_VOCAB, raw_config["vocab_size"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": raw_config.get("max_position_embeddings", 4096),
        "chat_template": MIXTRAL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, others to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (Path(args.out_dir) / "config.json").exists() and not args.force:
        print(f"{args.out_dir}: checkpoint already present (use --force to rewrite)")
        return 0
    write_checkpoint(args.out_dir, seed=args.seed)
    print(f"wrote tiny Mixtral checkpoint to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
