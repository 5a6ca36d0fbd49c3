"""One int8 MoE layer of bench-214m's shape: the native int8 experts against torch's weight-only
int8 kernels (what int8 experts ran on before) and the native bfloat16 experts, per token count.

    python -m bench.int8_kernels [--tokens 1 4 16 64 256] [--repeats 15]

E=8, top-2, D=512, F=1792, symmetric int8 per output channel. Each call starts from flushed
caches (a 256 MiB buffer touched before it); the median of `--repeats` calls, ms per layer, and
the effective read rate of the codes the call touches (1 byte a weight; bfloat16: 2).
The torch side is `QuantMatrix.linear` per expert (w13 fused, then w2), activations in bfloat16.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moe_parallel import native
from moe_parallel.model.quant import QuantConfig, QuantMatrix, dequantize, quantize

EXPERTS, HIDDEN, INTER, TOPK = 8, 512, 1792, 2


def build(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = QuantConfig("int8")
    w13 = [torch.randn(2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5 for _ in range(EXPERTS)]
    w2 = [torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5 for _ in range(EXPERTS)]
    q13, q2 = [quantize(w, cfg) for w in w13], [quantize(w, cfg) for w in w2]
    mats13, mats2 = [], []
    for a, b in zip(q13, q2, strict=True):
        m13 = QuantMatrix(2 * INTER, HIDDEN, cfg, torch.device("cpu"), torch.bfloat16)
        m13.put(0, a)
        m2 = QuantMatrix(HIDDEN, INTER, cfg, torch.device("cpu"), torch.bfloat16)
        m2.put(0, b)
        mats13.append(m13)
        mats2.append(m2)
    codes13, codes2 = torch.stack([q.codes for q in q13]), torch.stack([q.codes for q in q2])
    s13 = torch.stack([q.scale[:, 0].float() for q in q13])
    s2 = torch.stack([q.scale[:, 0].float() for q in q2])
    packed = (native.prepack(codes13, gated=True), native.prepack(codes2),
              {"w13_scale": native.prepack_scales(s13, gated=True), "w2_scale": native.prepack_scales(s2)})
    deq13 = torch.stack([dequantize(q) for q in q13]).bfloat16()
    deq2 = torch.stack([dequantize(q) for q in q2]).bfloat16()
    bf16 = (native.prepack(deq13, gated=True), native.prepack(deq2))
    return mats13, mats2, packed, bf16


def torch_layer(x, ids, wts, mats13, mats2):
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        t, k = torch.nonzero(ids == e, as_tuple=True)
        gate, up = mats13[e].linear(x[t]).chunk(2, dim=-1)
        out.index_add_(0, t, mats2[e].linear(F.silu(gate) * up) * wts[t, k, None].to(x.dtype))
    return out


def timed(fn, repeats: int, flush: torch.Tensor) -> float:
    times = []
    for _ in range(repeats):
        flush.add_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def row(x, ids, wts, mats13, mats2, int8, bf16, repeats: int, flush: torch.Tensor) -> str:
    (p13, p2, scales), (b13, b2) = int8, bf16
    used = int(ids.unique().numel())
    mb = used * 3 * HIDDEN * INTER / 1e6  # int8 bytes touched
    xb = x.bfloat16()
    ms = [timed(lambda: torch_layer(xb, ids, wts, mats13, mats2), max(3, repeats // 3), flush),
          timed(lambda: native.fused_moe(x, ids, wts, p13, p2, 0, EXPERTS, INTER, **scales), repeats, flush),
          timed(lambda: native.fused_moe(xb, ids, wts, p13, p2, 0, EXPERTS, INTER, **scales), repeats, flush),
          timed(lambda: native.fused_moe(xb, ids, wts, b13, b2, 0, EXPERTS, INTER), repeats, flush)]
    cells = [f"{s * 1e3:.3f} ({mb * (2 if i == 3 else 1) / 1e3 / s:.0f})" for i, s in enumerate(ms)]
    return f"| {x.shape[0]} | {used} | " + " | ".join(cells) + f" | {ms[0] / ms[2]:.2f}x |"


def run(tokens: list[int], repeats: int) -> str:
    mats13, mats2, (p13, p2, scales), (b13, b2) = build()
    flush = torch.empty(256 << 20, dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    lines = [f"int8 MoE layer, E={EXPERTS} top-{TOPK} D={HIDDEN} F={INTER}, native ISA {native.isa()}, "
             f"{torch.get_num_threads()} threads, median of {repeats} calls from flushed caches, ms (GB/s of "
             "weights read).", "",
             "| tokens | experts | torch int8 (bf16 act.) | native int8, float32 act. | native int8, bf16 act. | "
             "native bfloat16 experts | native int8 bf16 / torch int8 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in tokens:
        x = torch.randn(t, HIDDEN, generator=g)
        ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(t)])
        lines.append(row(x, ids, torch.rand(t, TOPK, generator=g), mats13, mats2, (p13, p2, scales), (b13, b2),
                         repeats, flush))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    print(run(args.tokens, args.repeats))


if __name__ == "__main__":
    main()
