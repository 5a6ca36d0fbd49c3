"""One MoE layer of bench-214m's shape: the native fused kernel against the torch path, per token count.

    python -m bench.moe_kernels [--dtype float32|bfloat16|both] [--tokens 1,4,8,16,32,64,256] [--sweep]

E=8 experts, top-2, D=512, F=1792; random weights (seed 0), routing by the real router on random
logits. Per token count: the median ms of one layer call (after warm-up, caches flushed before
each call, layers rotated), the bytes of the experts it touches (every expert with >= 1 row: its
w13 and w2) and that over the time, against the machine's read bandwidth measured just before
(bench.ceiling: summing 512 MiB; on a shared VM it moves from run to run).

The torch path is the one `LocalExperts` runs today (moe.py / experts.py at the time of writing,
copied here so that wiring the native kernels into those files does not change the baseline):
rows sorted by expert, two `torch._grouped_mm`, SiLU * up, scatter back, `combine`. vLLM's CPU op
(`torch.ops._C.cpu_fused_moe` through `vllm._custom_ops`) is timed on the same weights when
`vllm` imports (run this under .venv-peers/bin/python: same torch, so the library loads there).

--alternate times only the native kernel and vLLM's op, call by call in turn (the ratio a drifting
VM gives most steadily); --sweep times the native kernel's tuning alternatives (each knob of
native.set_tuning varied alone) so the defaults in csrc/dispatch.h can be re-measured on the
machine at hand; --isa avx2 times a forced ISA. Writes bench/results/moe_kernels_<dtype>.md (not for a forced ISA).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.ceiling import read_bandwidth
from moe_parallel import native
from moe_parallel.model.moe import route

RESULTS = Path(__file__).resolve().parent / "results"
EXPERTS, TOPK, HIDDEN, INTER = 8, 2, 512, 1792
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Layers:
    """A few layers' weights (random, seed 0), together larger than the last-level cache; each call
    takes the next layer, as a decode step does, and the caches are flushed before each timed call,
    so the weights come from memory."""

    def __init__(self, dtype: torch.dtype, min_bytes: float = 128e6):
        g = torch.Generator().manual_seed(0)
        per_layer = 3 * EXPERTS * INTER * HIDDEN * torch.finfo(dtype).bits // 8
        self.w13, self.w2, self.p13, self.p2 = [], [], [], []
        for _ in range(max(2, -(-int(min_bytes) // per_layer))):
            self.w13.append((torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype))
            self.w2.append((torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / INTER**0.5).to(dtype))
            self.p13.append(native.prepack(self.w13[-1], gated=True))
            self.p2.append(native.prepack(self.w2[-1]))
        self.i = 0

    def next(self) -> int:
        self.i = (self.i + 1) % len(self.w13)
        return self.i


def inputs(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    topk_weights, topk_ids = route(torch.randn(tokens, EXPERTS, generator=g), TOPK)
    return x, topk_weights, topk_ids


def torch_layer(x, topk_weights, topk_ids, w13, w2) -> torch.Tensor:
    """FloatExperts._grouped + combine, as LocalExperts calls them."""
    t, k = topk_ids.shape
    token = torch.arange(t).repeat_interleave(k)
    local_ids = topk_ids.flatten()
    order = torch.argsort(local_ids, stable=True)
    counts = torch.zeros(EXPERTS, dtype=torch.int64).scatter_add_(0, local_ids, torch.ones_like(local_ids))
    offsets = counts.cumsum(0).to(torch.int32)
    xs = x.index_select(0, token).index_select(0, order)
    gate, up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    ys = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
    y = torch.empty_like(ys)
    y[order] = ys
    out = torch.zeros(t, y.shape[-1], dtype=y.dtype)
    return out.index_add_(0, token, (y * topk_weights.flatten()[:, None]).to(y.dtype))


def vllm_layer(layers: Layers) -> Callable | None:
    """vLLM's CPU fused MoE on its own prepacked copy of each layer's weights, or None without vLLM.
    ISA as vLLM picks it: 'amx' for bfloat16 on AMX CPUs, else 'vec'. vLLM 0.32's op writes into
    a preallocated output: cpu_fused_moe(out, x, w13, w2, w13_bias, w2_bias, weights, ids, act, isa)."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    isa = "amx" if layers.w13[0].dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"
    packed = [(ops.cpu_prepack_moe_weight(a, isa), ops.cpu_prepack_moe_weight(b, isa))
              for a, b in zip(layers.w13, layers.w2, strict=True)]

    def call(x, tw, ti):
        p13, p2 = packed[layers.next()]
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, p13, p2, None, None, tw, ti.to(torch.int32), "silu", isa)
        return out
    return call


_FLUSH = torch.ones(96 * 2**20 // 4)  # 3x the last-level cache here (32 MiB)


def median_ms(fn: Callable[[], object], budget_s: float = 0.2) -> float:
    """Median ms of fn() after 2 warm-up calls, the caches flushed (by reading 96 MiB) before each."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    times = []
    for _ in range(max(5, min(100, int(budget_s / max(once, 1e-6))))):
        _FLUSH.sum()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def touched_bytes(topk_ids: torch.Tensor, dtype: torch.dtype) -> int:
    per_expert = 3 * INTER * HIDDEN * torch.finfo(dtype).bits // 8
    return int(topk_ids.unique().numel()) * per_expert


def torch_call(layers: Layers) -> Callable:
    def call(x, tw, ti):
        i = layers.next()
        return torch_layer(x, tw, ti, layers.w13[i], layers.w2[i])
    return call


def native_call(layers: Layers) -> Callable:
    def call(x, tw, ti):
        i = layers.next()
        return native.fused_moe(x, ti, tw, layers.p13[i], layers.p2[i], 0, EXPERTS, INTER)
    return call


def measure(dtype: torch.dtype, tokens: list[int]) -> list[dict]:
    """Per token count: bytes touched, the read bandwidth just before, and each path's median ms.
    (This VM's bandwidth moves between runs, hence one measurement per row.)"""
    layers = Layers(dtype)
    paths = {"torch": torch_call(layers), "native": native_call(layers), "vllm": vllm_layer(layers)}
    rows = []
    for t in tokens:
        x, tw, ti = inputs(t, dtype)
        row = {"tokens": t, "experts": int(ti.unique().numel()), "bytes": touched_bytes(ti, dtype),
               "bandwidth": read_bandwidth(0.5, 3)}
        for name, fn in paths.items():
            if fn is not None:
                row[name] = median_ms(lambda fn=fn, x=x, tw=tw, ti=ti: fn(x, tw, ti))
        rows.append(row)
    return rows


def table(dtype_name: str, rows: list[dict]) -> str:
    vllm = "vllm" in rows[0]
    head = ("| tokens | experts | MB read | torch ms | native ms | speedup | torch GB/s | native GB/s | "
            "read bandwidth GB/s | native of bandwidth |")
    head += " vLLM ms | native vs vLLM |" if vllm else ""
    lines = [f"{dtype_name}: native ISA {native.isa()}, {torch.get_num_threads()} threads, tuning {knobs()}. "
             "Read bandwidth: summing 512 MiB, measured just before each row.", "", head,
             "|" + " ---: |" * (head.count("|") - 1)]
    for r in rows:
        gbs = {k: r["bytes"] / r[k] / 1e6 for k in ("torch", "native")}
        line = (f"| {r['tokens']} | {r['experts']} | {r['bytes'] / 1e6:.1f} | {r['torch']:.3f} | {r['native']:.3f} | "
                f"{r['torch'] / r['native']:.2f}x | {gbs['torch']:.1f} | {gbs['native']:.1f} | "
                f"{r['bandwidth'] / 1e9:.1f} | {gbs['native'] * 1e9 / r['bandwidth']:.0%} |")
        if vllm:
            line += f" {r['vllm']:.3f} | {r['vllm'] / r['native']:.2f}x |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def knobs() -> dict[str, int]:
    return {k: v for k, v in native.tuning().items() if not k.startswith("max_")}


def sweep(dtype: torch.dtype, tokens: list[int]) -> str:
    """ms per layer for each tuning knob varied alone (the others at their defaults)."""
    call = native_call(Layers(dtype))
    default = native.tuning()
    base = knobs()
    suffix = "bf16" if dtype == torch.bfloat16 else "f32"
    options = {"gate_rows": range(1, default[f"max_gate_rows_{suffix}"] + 1),
               "down_rows": range(2, default[f"max_down_rows_{suffix}"] + 1, 2),
               "row_block": (16, 32, 64, 96, 128, 192, 384),
               "blocks_per_task": (1, 2, 4, 8), "k_slice": (0, 32, 64, 128, 256, 512),
               "slice_max_tiles": (2, 4, 8, 64),
               "prefetch": (False, True), "stream_prefetch": (0, 256, 512, 1024, 2048, 4096)}
    lines = ["| knob | value | " + " | ".join(f"{t} tok ms" for t in tokens) + " |",
             "| --- | ---: |" + " ---: |" * len(tokens)]
    for knob, values in options.items():
        for v in values:
            native.set_tuning(**(base | {knob: v}))
            ms = []
            for t in tokens:
                x, tw, ti = inputs(t, dtype)
                ms.append(median_ms(lambda x=x, tw=tw, ti=ti: call(x, tw, ti), budget_s=0.25))
            lines.append(f"| {knob} | {v} | " + " | ".join(f"{m:.3f}" for m in ms) + " |")
    native.set_tuning(**base)
    return f"Tuning sweep ({suffix}, defaults {base}; 0 = the register tile's maximum):\n\n" + "\n".join(lines) + "\n"


def alternate(dtype: torch.dtype, tokens: list[int], calls: int = 200) -> str:
    """Native against vLLM's op call by call, alternating in one process (caches flushed before
    each call): on a VM whose speed drifts within a run, the ratio of the two medians is the
    steadier figure."""
    layers = Layers(dtype)
    paths = {"native": native_call(layers), "vllm": vllm_layer(layers)}
    if paths["vllm"] is None:
        raise SystemExit("--alternate needs vLLM's CPU build (run under .venv-peers/bin/python)")
    lines = ["| tokens | native ms | vLLM ms | native GB/s | vLLM GB/s | native vs vLLM |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in tokens:
        x, tw, ti = inputs(t, dtype)
        for fn in paths.values():
            fn(x, tw, ti)
            fn(x, tw, ti)
        times: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(calls):
            name = "native" if i % 2 == 0 else "vllm"
            _FLUSH.sum()
            start = time.perf_counter()
            paths[name](x, tw, ti)
            times[name].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        gb = touched_bytes(ti, dtype) / 1e6
        lines.append(f"| {t} | {ms['native']:.3f} | {ms['vllm']:.3f} | {gb / ms['native']:.1f} | "
                     f"{gb / ms['vllm']:.1f} | {ms['vllm'] / ms['native']:.2f}x |")
    return (f"{DTYPES_NAME[dtype]}: native ISA {native.isa()} and vLLM's op alternating call by call, "
            f"{calls // 2} calls each, medians:\n\n" + "\n".join(lines) + "\n")


DTYPES_NAME = {v: k for k, v in DTYPES.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--tokens", default="1,4,8,16,32,64,256")
    parser.add_argument("--sweep", action="store_true", help="also time the tuning alternatives")
    parser.add_argument("--sweep-tokens", default="16,64,1024")
    parser.add_argument("--isa", default=None, help="force an ISA (as MOE_SERVE_KERNELS), e.g. avx2")
    parser.add_argument("--alternate", action="store_true",
                        help="only native against vLLM's op, alternating call by call (under .venv-peers)")
    args = parser.parse_args(argv)
    if args.isa:
        native.force(args.isa)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.reason()}")
    tokens = [int(t) for t in args.tokens.split(",")]
    with torch.inference_mode():
        for name in DTYPES if args.dtype == "both" else [args.dtype]:
            if args.alternate:
                print(alternate(DTYPES[name], tokens))
                continue
            text = table(name, measure(DTYPES[name], tokens))
            if args.sweep:
                text += "\n" + sweep(DTYPES[name], [int(t) for t in args.sweep_tokens.split(",")])
            print(text)
            if RESULTS.is_dir() and not args.isa:
                (RESULTS / f"moe_kernels_{name}.md").write_text(f"# MoE layer kernels, {name}\n\n{text}")


if __name__ == "__main__":
    main()
