"""One layer's decode attention of bench-214m's shape: the fused native op against the torch path.

    python -m bench.decode_attention [--batch 1,8,32] [--context 128,1024,4096] [--dtype float32|bfloat16|both]

H=8 query heads, G=2 KV heads, Dh=64; every row has the same context (q_pos = L - 1), its slots
from a random block table (16-slot blocks) over a cache of exactly that many slots. The torch path
is the one attention.py runs for decode rows at the time of writing, copied here so that wiring
the op in does not move the baseline: `_attend_decode` (gather K/V [B, L, G, Dh], two batched
products, the [B, L] mask, softmax in float32) for L <= TILE_TOKENS = 1024 and `_attend_tiled`
(online softmax over 1,024-position tiles) beyond. Prints the median microseconds of one call
(after warm-up) and, in brackets, the fastest one, as a markdown table: on a machine shared with
other work the minimum is the steadier number. --threads sets torch's (and the op's) thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_parallel import native

H, G, DH, BLOCK, TILE_TOKENS = 8, 2, 64, 16, 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_decode(q, k_cache, v_cache, ctx_slots, mask):
    """attention.py `_attend_decode` after `cache.gather`: q [B, H, Dh], mask [B, 1, 1, L]."""
    shape = (*ctx_slots.shape, *k_cache.shape[1:])
    flat = ctx_slots.reshape(-1)
    k, v = k_cache.index_select(0, flat).view(shape), v_cache.index_select(0, flat).view(shape)
    b, length, g, d = k.shape
    qg = q.view(b, g, H // g, d)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * d**-0.5
    scores = scores.masked_fill(~mask.view(b, 1, 1, length), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).view(b, H, d)


def torch_tiled(q, k_cache, v_cache, ctx_slots, q_pos):
    """attention.py `_attend_tiled` for one query per row (all valid, no window)."""
    b, h, d = q.shape
    kv, per, ql = G, H // G, 1
    qg = q.view(b, ql, kv, per, d).permute(0, 2, 3, 1, 4).reshape(b, kv, per * ql, d)
    best = torch.full((b, kv, per * ql, 1), float("-inf"))
    total = torch.zeros_like(best)
    acc = torch.zeros(b, kv, per * ql, d)
    pos = q_pos[:, None, None, None, None]
    for s in range(0, ctx_slots.shape[1], TILE_TOKENS):
        tile = ctx_slots[:, s:s + TILE_TOKENS]
        shape, flat = (*tile.shape, *k_cache.shape[1:]), tile.reshape(-1)
        k, v = k_cache.index_select(0, flat).view(shape), v_cache.index_select(0, flat).view(shape)
        t = k.shape[1]
        j = torch.arange(s, s + t)
        allowed = (j <= pos).expand(b, 1, per, ql, t).reshape(b, 1, per * ql, t)
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * d**-0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(new_best), 0.0, new_best)
        probs = torch.exp(scores - safe)
        scale = torch.exp(best - safe)
        total = total * scale + probs.sum(-1, keepdim=True)
        acc = acc * scale + torch.matmul(probs.to(v.dtype), v.transpose(1, 2)).float()
        best = new_best
    return (acc / total).to(q.dtype).view(b, kv, per, ql, d).permute(0, 3, 1, 2, 4).reshape(b, h, d)


def time_us(fn, budget_s: float = 0.2) -> tuple[float, float]:
    """(median, minimum) microseconds of one call."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    times = []
    for _ in range(max(5, min(2000, int(budget_s / once)))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, min(times) * 1e6


def case(b: int, length: int, dtype: torch.dtype) -> tuple[tuple[float, float], tuple[float, float], float]:
    gen = torch.Generator().manual_seed(0)
    blocks = -(-length // BLOCK)
    slots = b * blocks * BLOCK
    k_cache = torch.randn(slots + 1, G, DH, generator=gen).to(dtype)
    v_cache = torch.randn(slots + 1, G, DH, generator=gen).to(dtype)
    q = torch.randn(b, H, DH, generator=gen).to(dtype)
    tables = torch.randperm(b * blocks, generator=gen).view(b, blocks)
    j = torch.arange(length)
    ctx_slots = tables[:, j // BLOCK] * BLOCK + j % BLOCK
    q_pos = torch.full((b,), length - 1, dtype=torch.int64)
    if length <= TILE_TOKENS:
        mask = (j <= q_pos[:, None])[:, None, None, :]
        ref = lambda: torch_decode(q, k_cache, v_cache, ctx_slots, mask)  # noqa: E731
    else:
        ref = lambda: torch_tiled(q, k_cache, v_cache, ctx_slots, q_pos)  # noqa: E731
    fused = lambda: native.decode_attention(q, k_cache, v_cache, ctx_slots, q_pos, 0, DH**-0.5)  # noqa: E731
    err = (fused().float() - ref().float()).abs().max().item()
    return time_us(ref), time_us(fused), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--context", default="128,1024,4096")
    parser.add_argument("--dtype", default="both", choices=[*DTYPES, "both"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.reason()}")
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    print(f"decode attention, one layer: H={H}, G={G}, Dh={DH}; isa {native.isa()}, "
          f"{torch.get_num_threads()} threads; median (min) us per call\n")
    print("| dtype | B | context | torch path | fused | speed-up (median) | max abs diff |")
    print("|---|---:|---:|---|---|---:|---:|")
    for name in dtypes:
        for b in map(int, args.batch.split(",")):
            for length in map(int, args.context.split(",")):
                ref, fused, err = case(b, length, DTYPES[name])
                path = "decode" if length <= TILE_TOKENS else "tiled"
                print(f"| {name} | {b} | {length} | {ref[0]:.0f} ({ref[1]:.0f}) {path} | "
                      f"{fused[0]:.0f} ({fused[1]:.0f}) | {ref[0] / fused[0]:.1f}x | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
