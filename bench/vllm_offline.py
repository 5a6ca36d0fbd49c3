"""vLLM's offline throughput on a model, run inside vLLM's own virtualenv (`make bench-peers`).

    .venv-peers/bin/python bench/vllm_offline.py MODEL_DIR --batches 1 8 32 64 [--prompt-len 32 --output-len 64]

Prints one JSON line: {"batch": tok/s, ...}, each the best of `--repeats` runs of `LLM.generate`
on `batch` prompts of `--prompt-len` random token ids, greedy, exactly `--output-len` tokens
each (EOS ignored), after a warm-up at the same shapes. Imports nothing of this project, so it
runs where vLLM is installed.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.prompt_len + args.output_len + 16,
              max_num_seqs=max(args.batches), enforce_eager=False, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rng = random.Random(0)
    out = {}
    for batch in args.batches:
        prompts = [TokensPrompt(prompt_token_ids=[1] + [rng.randrange(3, 32000) for _ in range(args.prompt_len - 1)])
                   for _ in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up at the same shapes
        best = 0.0
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            tokens = sum(len(r.outputs[0].token_ids) for r in results)
            assert tokens == batch * args.output_len
            best = max(best, tokens / elapsed)
        out[batch] = best
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
