"""Float32, int8 and int4 experts side by side: decode speed, bytes read, quality.

    python -m bench.quant [--batches 1 32] [--steps 16] [--skip-quality] [--dtype bfloat16]

`single` layout in this process, bench-214m (float32 dense part; experts float32, int8 per
channel, or int4 in groups of 128; with `--dtype bfloat16` the model and its activations in
bfloat16, the "float32" rows then bfloat16 weights). Per scheme and batch: the decode step time and tok/s, the
weight bytes a step reads (dense once, plus the experts its tokens use: 2 per layer at batch 1,
all 8 from a few dozen tokens on), those bytes per token, and the fraction of the machine's
read bandwidth (measured in the same run) the step reaches. Then the quality of each scheme
against transformers' float32 (bench/quality.py: 8 prompts x 64 tokens, teacher-forced).
Writes bench/results/quant.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.ceiling import read_bandwidth
from bench.layouts import CACHE, MAX_LEN, _vocab
from bench.steps import decode_run
from cluster.plan import dense_bytes, expert_bytes
from moe_parallel.loading.loader import build_single
from moe_parallel.model.config import ModelConfig
from moe_parallel.model.packed import native_experts
from moe_parallel.model.quant import QuantConfig, matrix_bytes

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = {"float32": (QuantConfig(), False), "int8": (QuantConfig("int8"), False),
           "int4": (QuantConfig("int4", group_size=128), False),
           "int8 + dense": (QuantConfig("int8"), True), "int4 + dense": (QuantConfig("int4", group_size=128), True)}


def step_bytes(c: ModelConfig, quant: QuantConfig, dense_quantized: bool, batch: int,
               dtype: str = "float32") -> int:
    """Weight bytes one decode step reads: the dense part (less the embedding table, of which a
    step reads a row per token) and every expert at least one token of the step routes to."""
    experts_used = min(c.num_experts, batch * c.experts_per_token)
    size = 2 if dtype == "bfloat16" else 4
    dense = dense_bytes(c, dtype) - c.vocab_size * c.hidden_size * size
    if dense_quantized:  # attention projections and lm_head quantized; gates and norms stay float32
        d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        per_layer = matrix_bytes(q + 2 * kv, d, quant) + matrix_bytes(d, q, quant)
        float_per_layer = (d * q * 2 + d * kv * 2) * size
        dense += c.num_layers * (per_layer - float_per_layer) + matrix_bytes(c.vocab_size, d, quant) - \
            c.vocab_size * d * size
    act = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    scale_bytes = 4 if native_experts("cpu", act, quant) else 2  # the native kernels' float32 scales
    return dense + experts_used * expert_bytes(c, dtype, quant, scale_bytes)


def measure(path: Path, batches: list[int], steps: int, dtype: str = "float32") -> tuple[dict, float]:
    bw = read_bandwidth()
    c = ModelConfig.from_dir(path)
    out = {}
    for name, (quant, dense) in SCHEMES.items():
        runner = build_single(path, dtype, cache=CACHE, max_model_len=MAX_LEN, quant=quant, quantize_dense=dense)
        execute = lambda batches_, r=runner: [r.execute(batches_[0])]  # noqa: E731
        for b in batches:
            decode_run(execute, b, 32, 2, vocab=_vocab(path))  # warm-up at the same shapes
            step = min(decode_run(execute, b, 32, steps, vocab=_vocab(path)) for _ in range(2))
            out[(name, b)] = (step, step_bytes(c, quant, dense, b, dtype))
        del runner
    return out, bw


def speed_table(results: dict, bw: float, batches: list[int], dtype: str = "float32") -> str:
    lines = [f"Decode on bench-214m, `single` in process; read bandwidth measured in this run: "
             f"{bw / 1e9:.1f} GB/s.", "",
             f"| experts | batch | step (ms) | tok/s | vs {dtype} | MB read per step | MB per token | "
             "fraction of bandwidth |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in batches:
        base = results[("float32", b)][0]
        for name in SCHEMES:
            step, nbytes = results[(name, b)]
            label = name.replace("float32", dtype)
            lines.append(f"| {label} | {b} | {step * 1e3:.1f} | {b / step:.1f} | {base / step:.2f}x | "
                         f"{nbytes / 1e6:.0f} | {nbytes / b / 1e6:.1f} | {nbytes / step / bw:.0%} |")
    return "\n".join(lines) + "\n"


def quality_table(path: Path) -> str:
    from bench.quality import compare, prompts, reference_runs

    ps = prompts(_vocab(path))
    runs = reference_runs(path, ps)
    lines = ["Quality against transformers float32 (8 prompts x 64 tokens, teacher-forced):", "",
             "| experts | mean abs logprob error | p99 abs logprob error | greedy agreement |",
             "| --- | ---: | ---: | ---: |"]
    for name, (quant, dense) in SCHEMES.items():
        q = compare(build_single(path, quant=quant, quantize_dense=dense, max_model_len=MAX_LEN, cache=CACHE), ps, runs)
        lines.append(f"| {name} | {q.mean_abs_logprob_error:.4f} | {q.p99_abs_logprob_error:.4f} | "
                     f"{q.greedy_agreement:.1%} |")
    return "\n".join(lines) + "\n"


def run(path: Path, batches: list[int], steps: int, quality: bool = True, dtype: str = "float32") -> str:
    results, bw = measure(path, batches, steps, dtype)
    text = (f"Model dtype {dtype}.\n\n" if dtype != "float32" else "") + speed_table(results, bw, batches, dtype)
    if quality:
        text += "\n" + quality_table(path)
    return text


def main(argv: list[str] | None = None) -> int:
    from bench.models import bench_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    text = run(args.model or bench_model(), args.batches, args.steps, not args.skip_quality, args.dtype)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("quant.md" if args.dtype == "float32" else f"quant-{args.dtype}.md")).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
