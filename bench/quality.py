"""How far a quantized model's next-token distribution is from transformers' float32 one.

Teacher-forced, so one early disagreement does not snowball: transformers generates 64 greedy
tokens after each prompt in float32; our runner then scores the very same token sequences in
one prefill each. Per generated position we compare the log-probability of transformers'
chosen token (absolute error: mean and 99th percentile) and whether both pick the same
top-1 token (greedy agreement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_parallel.contract import SeqChunk, StepBatch
from moe_parallel.step.runner import ModelRunner


@dataclass(frozen=True)
class Quality:
    mean_abs_logprob_error: float
    p99_abs_logprob_error: float
    greedy_agreement: float
    positions: int


def prompts(vocab: int, count: int = 8, seed: int = 0) -> list[list[int]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = [4, 9, 15, 22, 30, 7, 12, 40][:count]
    return [[1, *torch.randint(3, vocab, (n,), generator=g).tolist()] for n in lengths]


@torch.inference_mode()
def reference_runs(path, prompt_ids: list[list[int]], new_tokens: int = 64) -> list[tuple[list[int], torch.Tensor]]:
    """transformers float32: (prompt + its greedy continuation, log-probs at every position)."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    runs = []
    for p in prompt_ids:
        ids = torch.tensor([p])
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)[0]
        runs.append((seq.tolist(), torch.log_softmax(model(seq[None]).logits[0].float(), -1)))
    return runs


def compare(runner: ModelRunner, prompt_ids: list[list[int]], runs) -> Quality:
    errors, agree = [], []
    for p, (seq, ref) in zip(prompt_ids, runs, strict=True):
        blocks = tuple(range(-(-len(seq) // runner.cache.block_size)))
        logits = runner.step(StepBatch((SeqChunk(0, tuple(seq), 0, blocks),), all_logits=True))
        ours = torch.log_softmax(logits.float().cpu(), -1)
        for t in range(len(p) - 1, len(seq) - 1):
            errors.append(abs(ours[t, seq[t + 1]] - ref[t, seq[t + 1]]).item())
            agree.append(bool(ours[t].argmax() == ref[t].argmax()))
    e = torch.tensor(errors)
    return Quality(e.mean().item(), e.quantile(0.99).item(), sum(agree) / len(agree), len(agree))
