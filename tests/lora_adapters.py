"""Random PEFT LoRA adapters made on the fly with `peft` itself, and transformers + PeftModel as
the reference for what they should produce."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def write_adapter(base: Path, out: Path, seed: int, rank: int = 4, targets: list[str] | None = None,
                  **extra) -> Path:
    """A LoRA adapter with non-zero B (init_lora_weights=False), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or TARGETS, init_lora_weights=False,
                        **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # large enough deltas that the adapter visibly changes the greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(str(out))
    return out


@lru_cache(maxsize=8)
def _peft(base: str, adapter: str):
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None
    return PeftModel.from_pretrained(model, adapter).eval()  # applied, not merged


@torch.inference_mode()
def peft_greedy(base: Path, adapter: Path, prompt: list[int], steps: int) -> list[int]:
    model = _peft(str(base), str(adapter))
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
