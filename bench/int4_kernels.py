"""One int4 MoE layer of bench-214m's shape: the native int4 experts against torch's weight-only
int4 kernels (what int4 experts ran on before), the native int8 and the native bfloat16 experts,
per token count; and both ways a native int4 task can run, to place `q4_dequant_rows`.

    python -m bench.int4_kernels [--tokens 1 4 16 64 256] [--repeats 15] [--group 128]

E=8, top-2, D=512, F=1792, int4 asymmetric per group of `--group` inputs (compressed-tensors'
math). Each call starts from flushed caches (a 256 MiB buffer touched before it); the median of
`--repeats` calls, ms per layer, and in brackets the effective read rate (GB/s) of the weights the
call touches: int4 half a byte a weight (scales not counted), int8 1, bfloat16 2.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.int8_kernels import timed
from moe_parallel import native
from moe_parallel.model.quant import QuantConfig, QuantMatrix, dequantize, quantize

EXPERTS, HIDDEN, INTER, TOPK = 8, 512, 1792, 2
REGISTERS, DEQUANTIZED = 1 << 30, 0  # q4_dequant_rows forcing one way for every task


def build(group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q4, q8 = QuantConfig("int4", group_size=group), QuantConfig("int8")
    w13 = [torch.randn(2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5 for _ in range(EXPERTS)]
    w2 = [torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5 for _ in range(EXPERTS)]
    a13, a2 = [quantize(w, q4) for w in w13], [quantize(w, q4) for w in w2]
    mats = []
    for a, b in zip(a13, a2, strict=True):
        m13 = QuantMatrix(2 * INTER, HIDDEN, q4, torch.device("cpu"), torch.bfloat16)
        m13.put(0, a)
        m2 = QuantMatrix(HIDDEN, INTER, q4, torch.device("cpu"), torch.bfloat16)
        m2.put(0, b)
        mats.append((m13, m2))

    def stacked(qs, part):
        return torch.stack([getattr(q, part) for q in qs])

    int4 = (native.prepack_q4(stacked(a13, "codes"), gated=True), native.prepack_q4(stacked(a2, "codes")),
            {"w13_scale": native.prepack_q4_scales(stacked(a13, "scale").float(), stacked(a13, "zero"), gated=True),
             "w2_scale": native.prepack_q4_scales(stacked(a2, "scale").float(), stacked(a2, "zero"))})
    b13, b2 = [quantize(w, q8) for w in w13], [quantize(w, q8) for w in w2]
    int8 = (native.prepack(stacked(b13, "codes"), gated=True), native.prepack(stacked(b2, "codes")),
            {"w13_scale": native.prepack_scales(stacked(b13, "scale")[..., 0].float(), gated=True),
             "w2_scale": native.prepack_scales(stacked(b2, "scale")[..., 0].float())})
    bf16 = (native.prepack(torch.stack([dequantize(q) for q in a13]).bfloat16(), gated=True),
            native.prepack(torch.stack([dequantize(q) for q in a2]).bfloat16()))
    return mats, int4, int8, bf16


def torch_layer(x, ids, wts, mats):
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        t, k = torch.nonzero(ids == e, as_tuple=True)
        gate, up = mats[e][0].linear(x[t]).chunk(2, dim=-1)
        out.index_add_(0, t, mats[e][1].linear(F.silu(gate) * up) * wts[t, k, None].to(x.dtype))
    return out


def with_threshold(rows: int, fn):
    base = {k: v for k, v in native.tuning().items() if not k.startswith("max_")}

    def call():
        native.set_tuning(**(base | {"q4_dequant_rows": rows}))
        try:
            return fn()
        finally:
            native.set_tuning(**base)
    return call


def row(x, ids, wts, mats, int4, int8, bf16, repeats: int, flush: torch.Tensor) -> str:
    (p13, p2, s4), (q13, q2, s8), (b13, b2) = int4, int8, bf16
    xb = x.bfloat16()
    used = int(ids.unique().numel())
    mw = used * 3 * HIDDEN * INTER / 1e6  # millions of weights touched

    def q4(a, rows=None):
        fn = lambda: native.fused_moe(a, ids, wts, p13, p2, 0, EXPERTS, INTER, **s4)  # noqa: E731
        return fn if rows is None else with_threshold(rows, fn)

    cases = [(lambda: torch_layer(xb, ids, wts, mats), 0.5, max(3, repeats // 3)),
             (q4(x), 0.5, repeats), (q4(xb), 0.5, repeats), (q4(xb, REGISTERS), 0.5, repeats),
             (q4(xb, DEQUANTIZED), 0.5, repeats),
             (lambda: native.fused_moe(xb, ids, wts, q13, q2, 0, EXPERTS, INTER, **s8), 1.0, repeats),
             (lambda: native.fused_moe(xb, ids, wts, b13, b2, 0, EXPERTS, INTER), 2.0, repeats)]
    ms = [timed(fn, n, flush) for fn, _, n in cases]
    cells = [f"{s * 1e3:.3f} ({mw * nbytes / 1e3 / s:.0f})" for s, (_, nbytes, _) in zip(ms, cases, strict=True)]
    return f"| {x.shape[0]} | {used} | " + " | ".join(cells) + f" | {ms[0] / ms[2]:.2f}x |"


def run(tokens: list[int], repeats: int, group: int) -> str:
    mats, (p13, p2, s4), (q13, q2, s8), (b13, b2) = build(group)
    flush = torch.empty(256 << 20, dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    lines = [f"int4 MoE layer (group {group}), E={EXPERTS} top-{TOPK} D={HIDDEN} F={INTER}, native ISA "
             f"{native.isa()}, {torch.get_num_threads()} threads, median of {repeats} calls from flushed caches, "
             "ms (GB/s of weights read).", "",
             "| tokens | experts | torch int4 (bf16 act.) | native int4, f32 act. | native int4, bf16 act. | "
             "bf16 act., codes in registers | bf16 act., blocks dequantized | native int8, bf16 act. | "
             "native bf16 experts | native int4 bf16 / torch int4 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in tokens:
        x = torch.randn(t, HIDDEN, generator=g)
        ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(t)])
        lines.append(row(x, ids, torch.rand(t, TOPK, generator=g), mats, (p13, p2, s4), (q13, q2, s8), (b13, b2),
                         repeats, flush))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args(argv)
    print(run(args.tokens, args.repeats, args.group))


if __name__ == "__main__":
    main()
