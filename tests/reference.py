"""The ground truth: transformers' MixtralForCausalLM on the same checkpoint."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def reference_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    # Parity runs a fixed number of steps: no end-of-sequence stop (and no min_new_tokens, which
    # would do it by masking EOS and so change the argmax).
    model.generation_config.eos_token_id = None
    return model.eval()


@torch.inference_mode()
def reference_logits(path: str, prompt: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [L, V] of every prompt position, in float32."""
    return reference_model(str(path), dtype)(torch.tensor([prompt])).logits[0].float()


@torch.inference_mode()
def reference_greedy(path: str, prompt: list[int], steps: int, dtype: torch.dtype = torch.float32) -> list[int]:
    out = reference_model(str(path), dtype).generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
        max_new_tokens=steps, do_sample=False, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()
