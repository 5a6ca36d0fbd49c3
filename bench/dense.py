"""Dense products of bench-214m's shapes (q/k/v, o_proj, router gate, lm_head): which CPU path is fastest.

    python -m bench.dense [--rows 1,8,16,32,64,256] [--dtype float32|bfloat16|both] [--cold] [--shapes lm_head]

For each weight and row count: `F.linear` (ATen -> MKL/oneDNN per call), the project's
`linear` (the transposed product at mid row counts), and oneDNN on a weight reordered once
(`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`, what vLLM's CPU build calls
`onednn_mm`), and the project's own kernel on a weight packed once (`native.prepack` +
`native.dense`, where the native library is built). Median microseconds of repeated calls after
a warm-up; the fastest is starred. With `--cold` every call starts from flushed caches (a 256 MiB
buffer touched before it), as a decode step meets its weights after the rest of the model.
The engine's choices (`moe_parallel/model/dense.py`, and
`layers.linear` for the plain weights) were made from this table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moe_parallel import native
from moe_parallel.model.dense import onednn_takes
from moe_parallel.model.layers import linear

SHAPES = {"qkv [768, 512]": (768, 512), "o_proj [512, 512]": (512, 512), "gate [8, 512]": (8, 512),
          "lm_head [32000, 512]": (32000, 512)}


FLUSH: torch.Tensor | None = None  # set by --cold


def timed(fn, repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if FLUSH is not None:
            FLUSH.add_(1)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def variants(w: torch.Tensor, rows: int) -> dict:
    out = {"F.linear": lambda x: F.linear(x, w), "layers.linear": lambda x: linear(x, w)}
    if onednn_takes(w.dtype):  # not bfloat16 on an AVX2 CPU (model/dense.py)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        out["oneDNN packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if native.available():
        mine = native.prepack(w)
        out["native packed"] = lambda x: native.dense(x, mine, w.shape[0])
    return out


def table(dtype: torch.dtype, rows_list: list[int], shapes: list[str] | None = None) -> list[str]:
    g = torch.Generator().manual_seed(0)
    names = list(variants(torch.zeros(8, 8, dtype=dtype), 1))
    cold = ", from flushed caches" if FLUSH is not None else ""
    lines = [f"\n{str(dtype).split('.')[-1]}, {torch.get_num_threads()} threads, "
             f"microseconds per call (median{cold})\n",
             "| weight | rows | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for label, (out, inp) in SHAPES.items():
        if shapes and not any(label.startswith(n) for n in shapes):
            continue
        w = torch.randn(out, inp, generator=g).to(dtype)
        for rows in rows_list:
            x = torch.randn(rows, inp, generator=g).to(dtype)
            fns = variants(w, rows)
            ref = F.linear(x.float(), w.float())
            for name, fn in fns.items():
                err = (fn(x).float() - ref).abs().max().item()
                assert err < (1e-3 if dtype == torch.float32 else 0.5), (name, err)
            us = {name: timed(lambda f=fn, a=x: f(a)) for name, fn in fns.items()}
            best = min(us, key=us.get)
            cells = [f"**{us[n]:.0f}**" if n == best else f"{us[n]:.0f}" for n in names]
            lines.append(f"| {label} | {rows} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,16,32,64,256")
    ap.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    ap.add_argument("--cold", action="store_true", help="flush the caches before every call")
    ap.add_argument("--shapes", nargs="+", default=None, help="only these weights (qkv, o_proj, gate, lm_head)")
    args = ap.parse_args(argv)
    global FLUSH
    FLUSH = torch.empty(256 << 20, dtype=torch.uint8) if args.cold else None
    rows = [int(r) for r in args.rows.split(",")]
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    for dtype in dtypes:
        print("\n".join(table(dtype, rows, args.shapes)))


if __name__ == "__main__":
    main()
