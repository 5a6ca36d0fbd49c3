"""`make bench`: the whole benchmark suite on the bench-214m model, in one run.

1. the machine's ceiling (memory read bandwidth, float32 matmul rate);
2. the in-process engine against transformers `generate` at concurrency 1/8/32/64, each
   result also as a fraction of its ceiling (batch 1: active-weight bytes per token over the
   bandwidth; larger batches: active FLOPs per token over the matmul rate);
3. the layouts side by side at batch 1, 16 and 32 (single, colocated ep=2, disaggregated A=1 N=2
   on Ray over shared memory and over gloo) with the exchange's share of the step, where one
   decode step's time goes, and one layer's exchange per transport at 1, 64 and 4,096 rows;
4. the HTTP route under load (TTFT, inter-token latency, tokens/s at concurrency 1/8/32);
5. float32, int8 and int4 experts (and quantized dense layers) side by side, speed and quality;
6. ping-pong micro-batches of the disaggregated layout, m = 1..4;
7. LoRA adapters in the batch: 0, 1 and 4 distinct adapters at 32 streams;
8. structured outputs: 0%, 50% and 100% of 32 streams constrained by a JSON schema, and the
   grammar engines compared (llguidance, which serves them, and xgrammar);
9. prefix caching on a shared-prefix workload (1,024-token prefix, 64-token suffixes, 32
   streams): TTFT p50 and tok/s with caching on and off;
10. the CPU kernels: one MoE layer, native against torch's grouped products (bench.moe_kernels;
    vLLM's op beside them under .venv-peers), the int8 layer against torch's int8 kernels
    (bench.int8_kernels), the int4 layer against torch's int4 kernels (bench.int4_kernels), the
    dense products (bench.dense), and a batch-1 decode step against the weight-read bound with
    its profile (bench.decode_bound).

Writes bench/results/suite.md (and the PNG plots of each part) and prints the tables.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench import (
    ceiling,
    decode_bound,
    dense,
    engine_throughput,
    exchange,
    fuzz,
    grammar,
    hops,
    http_load,
    int4_kernels,
    int8_kernels,
    layouts,
    lora,
    moe_kernels,
    pingpong,
    prefix,
    quant,
    structured,
)
from bench.models import bench_model
from cluster.plan import dense_bytes, expert_bytes
from moe_parallel.model.config import ModelConfig

RESULTS = Path(__file__).resolve().parent / "results"


def active_per_token(c: ModelConfig) -> tuple[int, int]:
    """(bytes of weights a token's matmuls read, FLOPs it costs), float32; the embedding row is free."""
    embed = c.vocab_size * c.hidden_size * 4
    weights = dense_bytes(c, "float32") - embed + c.experts_per_token * expert_bytes(c, "float32")
    return weights, 2 * weights // 4


def ceiling_table(bw: float, flops: float, c: ModelConfig, ours: dict[int, float]) -> str:
    bytes_tok, flops_tok = active_per_token(c)
    bw_bound, flop_bound = bw / bytes_tok, flops / flops_tok
    lines = [f"Ceiling measured in this run: memory read {bw / 1e9:.1f} GB/s, float32 matmul "
             f"{flops / 1e9:.0f} GFLOP/s. A token reads {bytes_tok / 1e6:.0f} MB of active weights and costs "
             f"{flops_tok / 1e6:.0f} MFLOP.", "",
             "| concurrency | engine tok/s | bound | bound tok/s | fraction of bound |",
             "| ---: | ---: | --- | ---: | ---: |"]
    for conc, rate in ours.items():
        if conc == 1:
            lines.append(f"| 1 | {rate:.1f} | bandwidth (weights read once per token) | {bw_bound:.1f} | "
                         f"{rate / bw_bound:.0%} |")
        else:
            lines.append(f"| {conc} | {rate:.1f} | matmul rate (active FLOPs) | {flop_bound:.0f} | "
                         f"{rate / flop_bound:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="smaller loads, for a fast look")
    args = ap.parse_args(argv)
    start = time.monotonic()
    path = bench_model()
    c = ModelConfig.from_dir(path)
    args.out.mkdir(parents=True, exist_ok=True)
    out_len = "16" if args.quick else "64"
    bw, flops = ceiling.read_bandwidth(), ceiling.matmul_rate()
    engine_throughput.main(["--out", str(args.out), "--output-len", out_len, "--repeats", "1" if args.quick else "3"])
    ours = _rates(args.out / "engine_throughput.md")
    text, rests = layouts.run(path, [1, 16, 32], prompt_len=32, steps=8 if args.quick else 16)
    exchange_text = exchange.table([1, 64, 4096], c.hidden_size, 50 if args.quick else 200)
    http_load.main(["--out", str(args.out), "--concurrency", "1", "8", "32",
                    "--output-len", "16" if args.quick else "32"])
    hops.main(["--out", str(args.out), "--concurrency", "1", "32", "--output-len", "16" if args.quick else "32"])
    if fuzz.main(["--requests", "1000" if args.quick else "5000"]):
        raise SystemExit("bench.fuzz: the long fuzz run failed")
    quant_text = quant.run(path, [1, 32], 8 if args.quick else 16)
    quant_text += "\n" + quant.run(path, [1, 32], 8 if args.quick else 16, quality=False, dtype="bfloat16")
    pingpong.main(["--out", str(args.out), "--batches", "8", "32", "--steps", "8" if args.quick else "16"])
    lora_text = lora.run(32, 16, 16 if args.quick else 64)
    structured_text = structured.run(32, 16 if args.quick else 64)
    grammar.main(["--batch", "32"])
    prefix_text = prefix.run(32, 1024, 64, 8 if args.quick else 32)
    moe_kernels.main(["--dtype", "both"])
    kernels_text = "\n".join((RESULTS / f"moe_kernels_{d}.md").read_text() for d in ("float32", "bfloat16"))
    kernels_text += "\n" + int8_kernels.run([1, 4, 16, 64, 256], 15)
    kernels_text += "\n" + int4_kernels.run([1, 4, 16, 64, 256], 15, 128)
    dense_text = "\n".join(dense.table(torch.float32, [1, 16, 64]) + dense.table(torch.bfloat16, [1, 16, 64]))
    bound_text = decode_bound.run(["float32", "bfloat16"], 16 if args.quick else 64)
    machine = (f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
               f"{platform.python_version()}, torch {torch.__version__}; suite ran in "
               f"{(time.monotonic() - start) / 60:.1f} min.")
    report = "\n".join([
        "# Benchmark suite (bench-214m)", "", machine, "",
        "## Engine against transformers", "", (args.out / "engine_throughput.md").read_text(),
        "## Against the machine's ceiling", "", ceiling_table(bw, flops, c, ours),
        "## Layouts", "", text,
        "Profiles add up to the measured step within " + ", ".join(f"{r:.1%}" for r in rests) + ".", "",
        "### One layer's exchange per transport", "", exchange_text,
        "## Through HTTP", "", (args.out / "http_load.md").read_text(),
        "### The served path, hop by hop", "", (args.out / "hops.md").read_text(),
        "## Quantized experts", "", quant_text,
        "## Ping-pong micro-batches (disaggregated)", "", (args.out / "pingpong.md").read_text(),
        "## LoRA adapters in the batch", "", lora_text,
        "## Structured outputs in the batch", "", structured_text,
        (RESULTS / "grammar.md").read_text().replace("# Grammar", "### Grammar"),
        "## Prefix caching", "", prefix_text,
        "## CPU kernels", "", kernels_text.replace("# MoE layer", "### MoE layer"), "### Dense products", dense_text,
        "", "### A batch-1 decode step against the weight-read bound", "", bound_text,
    ])
    (args.out / "lora.md").write_text(lora_text)
    (args.out / "structured.md").write_text(structured_text)
    (args.out / "prefix.md").write_text(prefix_text)
    (args.out / "quant.md").write_text(quant_text)
    (args.out / "suite.md").write_text(report)
    print(report)
    from bench import plots

    plots.main(["--results", str(args.out)])  # the PNGs beside the tables
    return 0


def _rates(table: Path) -> dict[int, float]:
    rates = {}
    for line in table.read_text().splitlines():
        cells = [x.strip() for x in line.strip("|").split("|")]
        if cells and cells[0].isdigit():
            rates[int(cells[0])] = float(cells[1])
    return rates


if __name__ == "__main__":
    raise SystemExit(main())
