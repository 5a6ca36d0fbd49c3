"""Loading and calling the prebuilt native MoE kernels (`torch.ops.moe_serve.*`, csrc/).

The library is built ahead of time (`python -m moe_parallel.native.build`) and loaded here on
first use, never compiled on the fly. `MOE_SERVE_KERNELS` picks what runs:

    auto         (default) the best ISA this CPU has: avx512_bf16 > avx512 > avx2 > generic
    torch        the native kernels are off: `available()` is False, callers keep the torch path
    avx512_bf16 | avx512 | avx2 | generic   that ISA's kernels (unavailable if the CPU lacks it);
                 `avx2` on an AVX-512 machine stands in for one without AVX-512

Data flow of one layer: weights `prepack`ed once at load ([X, 2F, D] w13 gated, [X, D, F] w2)
-> `fused_moe(x, topk_ids, topk_weights, ...)` sorts the (token, k) pairs by expert, runs gate/up
with SiLU*up fused, the down projection and the weighted top-k sum in one call -> out [T, D].
`fused_experts_rows` is the same without the sum: one output row per routed row.
"""

from __future__ import annotations

import os

import torch

from moe_parallel.native.paths import LIBRARY

MODES = ("auto", "torch", "amx_bf16", "avx512_bf16", "avx512", "avx2", "generic")
BLOCK = 32  # output columns per packed block (csrc/kernels.h)

TORCH_REASON = "MOE_SERVE_KERNELS=torch: native kernels switched off"
_loaded: bool = False
_reason: str | None = None  # why the kernels are unavailable; None when they are
_decided = False


def _load_library() -> str | None:
    global _loaded
    if _loaded:
        return None
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built (run `python -m moe_parallel.native.build`)"
    try:
        torch.ops.load_library(str(LIBRARY))
    except (OSError, RuntimeError) as e:
        return f"loading {LIBRARY} failed: {e}"
    _loaded = True
    return None


def _decide(mode: str) -> str | None:
    """Applies `mode`; returns the reason the kernels are off, or None."""
    mode = mode.strip().lower() or "auto"
    if mode not in MODES:
        return f"MOE_SERVE_KERNELS={mode!r} is not one of {', '.join(MODES)}"
    if mode == "torch":
        return TORCH_REASON
    failed = _load_library()
    if failed:
        return failed
    if not torch.ops.moe_serve.isa_supported(mode if mode != "auto" else torch.ops.moe_serve.best_isa()):
        return f"MOE_SERVE_KERNELS={mode}: this CPU cannot run it (best: {torch.ops.moe_serve.best_isa()})"
    torch.ops.moe_serve.set_isa(mode)
    return None


def force(mode: str | None) -> None:
    """Re-selects the kernels as if MOE_SERVE_KERNELS were `mode` (None: the variable's value).
    float and bfloat16 weights packed before keep the layout of the kernels they were packed for
    (AVX2's is its own, csrc/kernels.h): pack again after forcing another ISA (the calls refuse the shape)."""
    global _reason, _decided
    _reason = _decide(os.environ.get("MOE_SERVE_KERNELS", "auto") if mode is None else mode)
    _decided = True


def reason() -> str:
    """Why the native kernels are unavailable ('' when they are available)."""
    if not _decided:
        force(None)
    return _reason or ""


def torch_forced() -> bool:
    """Whether MOE_SERVE_KERNELS=torch asks for the torch path everywhere (for comparison and tests)."""
    return reason() == TORCH_REASON


def available() -> bool:
    return not reason()


def isa() -> str:
    """The ISA whose kernels run ('amx_bf16', 'avx512_bf16', 'avx512', 'avx2', 'generic'), or 'torch'."""
    return torch.ops.moe_serve.isa() if available() else "torch"


def supported_isas() -> list[str]:
    """The ISAs this CPU can run, best first (empty when the library is not built)."""
    if _load_library():
        return []
    return [m for m in MODES[2:] if torch.ops.moe_serve.isa_supported(m)]


def _ops():
    if not available():
        raise RuntimeError(f"native MoE kernels unavailable: {reason()}")
    return torch.ops.moe_serve


def _blocks(n: int, gated: bool) -> tuple[int, int]:
    """The 32-column blocks of a packed weight with n outputs (gated: n = 2F, F columns a half) and
    the columns a block's k-row holds."""
    return -(-(n // 2 if gated else n) // BLOCK), 2 * BLOCK if gated else BLOCK


def halves(dtype: torch.dtype) -> bool:
    """Whether the running kernels take `dtype` (float32 or bfloat16) weights in halves
    (csrc/kernels.h: each block's k-rows cut in two 16-column halves held one after the other;
    AVX2). int8 codes never are."""
    return dtype in (torch.float32, torch.bfloat16) and _ops().halves(dtype == torch.bfloat16)


def packed_shape(num_experts: int, n: int, k: int, gated: bool, dtype: torch.dtype) -> tuple[int, ...]:
    """Shape `prepack` gives a [num_experts, n, k] weight of `dtype` (float32, bfloat16, or int8
    codes, which keep float32's order of whole k-rows) for the running kernels: preallocate it to
    pack expert by expert."""
    blocks, width = _blocks(n, gated)
    rows, pair = (-(-k // 2), (2,)) if dtype == torch.bfloat16 else (k, ())
    if halves(dtype):
        return (num_experts, blocks, 2, rows, width // 2, *pair)
    return (num_experts, blocks, rows, width, *pair)


def gate_up(w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a packed float w13's gate (w1) and up (w3) columns, of one expert ([blocks, ...]) or
    all ([X, blocks, ...]): each has the shape `prepack` gives the w1 (or w3) [F, K] alone, so
    `prepack_into(w1, scratch)` then `gate.copy_(scratch)` fills w1's place."""
    if w13.dtype == torch.bfloat16:  # [..., K/2, 64, 2], or in halves [..., 2, K/2, 32, 2]
        half = w13.shape[-2] // 2
        return w13[..., :half, :], w13[..., half:, :]
    half = w13.shape[-1] // 2  # [..., K, 64], or in halves [..., 2, K, 32]
    return w13[..., :half], w13[..., half:]


def prepack(w: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """w [X, N, K] (or one expert's [N, K]) float32/bfloat16 -> the kernels' blocked layout.
    gated=True for w13 = [w1; w3] stacked along N (N = 2F)."""
    return _ops().prepack(w, gated)


def prepack_into(w: torch.Tensor, out: torch.Tensor, gated: bool = False) -> None:
    """`prepack` of one expert's w [N, K] into `out`, contiguous and of `prepack`'s shape."""
    _ops().prepack_into(w, out, gated)


def prepack_scales(scale: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """The per-output-column scales [X, N] (or [N]) of int8 codes packed by `prepack`, in the packed
    column order, float32: [X, ceil(N/32) * 32], or [X, ceil(F/32), 64] when gated (N = 2F)."""
    return _ops().prepack_scales(scale, gated)


def scale_shape(num_experts: int, n: int, gated: bool) -> tuple[int, ...]:
    """Shape `prepack_scales` gives [num_experts, n] scales."""
    blocks, _ = _blocks(n, gated)
    return (num_experts, blocks, 2 * BLOCK) if gated else (num_experts, blocks * BLOCK)


def has_q8() -> bool:
    """Whether the running ISA has int8 weight-only expert products of its own (AVX-512, AVX2 and
    the generic unit; elsewhere int8 packed experts would run the generic ones, so they stay on torch)."""
    return available() and torch.ops.moe_serve.has_q8()


def has_q4() -> bool:
    """Whether the running ISA has int4 weight-only expert products of its own (AVX-512 and AVX2;
    elsewhere int4 experts stay on torch's weight-only kernels)."""
    return available() and torch.ops.moe_serve.has_q4()


def q4_packed_shape(num_experts: int, n: int, k: int, gated: bool) -> tuple[int, ...]:
    """Shape (uint8) `prepack_q4` gives [num_experts, n, k] int4 codes: two codes a byte."""
    blocks, width = _blocks(n, gated)
    return (num_experts, blocks, k, width // 2)


def q4_scale_shape(num_experts: int, n: int, groups: int, gated: bool) -> tuple[int, ...]:
    """Shape (float32) `prepack_q4_scales` gives [num_experts, n, groups] scales."""
    blocks, width = _blocks(n, gated)
    return (num_experts, blocks, groups, 2, width)


def prepack_q4(codes: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """Signed int4 codes [X, N, K] (or [N, K]) int8 in [-8, 7] -> the kernels' nibble layout, uint8
    (csrc/kernels.h). gated=True for w13 = [w1; w3] stacked along N."""
    return _ops().prepack_q4(codes, gated)


def prepack_q4_into(codes: torch.Tensor, out: torch.Tensor, gated: bool = False) -> None:
    """`prepack_q4` of one expert's codes [N, K] into `out`, contiguous and of its shape."""
    _ops().prepack_q4_into(codes, out, gated)


def prepack_q4_scales(scale: torch.Tensor, zero: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """Per-group scales [X, N, K/G] (or [N, K/G]) and int8 zero points of the same shape (None:
    symmetric) of int4 codes -> float32 [X, blocks, K/G, 2, width]: each block's scales, then its
    biases -(8 + zero) * scale, the form the kernels dequantize with (u * scale + bias)."""
    return _ops().prepack_q4_scales(scale, zero, gated)


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_packed: torch.Tensor,
              w2_packed: torch.Tensor, first_expert: int = 0, num_local_experts: int | None = None,
              intermediate: int | None = None, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * SwiGLU_{topk_ids[t, k]}(x[t]) over the experts held here,
    [first_expert, first_expert + num_local_experts); other ids contribute 0. x [T, D] -> [T, D].
    int8 packed weights (codes) take their `prepack_scales` scales, int4 ones (uint8) their
    `prepack_q4_scales`."""
    if intermediate is None:
        raise TypeError("fused_moe needs `intermediate` (F): the bfloat16 packed shape leaves its parity open")
    experts = w13_packed.shape[0] if num_local_experts is None else num_local_experts
    return _ops().fused_moe(x, topk_ids, topk_weights.float(), w13_packed, w2_packed, first_expert, experts,
                            intermediate, w13_scale, w2_scale)


def fused_experts_rows(x: torch.Tensor, local_ids: torch.Tensor, w13_packed: torch.Tensor, w2_packed: torch.Tensor,
                       intermediate: int, w13_scale: torch.Tensor | None = None,
                       w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y[i] = SwiGLU_{local_ids[i]}(x[i]) for routed rows x [N, D], ids in [0, X): [N, D], row order kept."""
    return _ops().fused_experts_rows(x, local_ids, w13_packed, w2_packed, intermediate, w13_scale, w2_scale)


def combine_rows(y: torch.Tensor, weights: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out[token[i]] += weights[i] * y[i] into zeros [num_tokens, D], rounded as torch's
    `zeros().index_add_(0, token, (y * weights[:, None]).to(y.dtype))`."""
    return _ops().combine_rows(y, weights.float(), token, num_tokens)


def shm_dispatch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int, rings: torch.Tensor,
                 cap: int, word: int, layer: int, micro_batch: int, cores: int = 0) -> list[torch.Tensor]:
    """An attention rank's layer into its rings to the expert ranks (csrc/exchange.h): [token [N],
    router weight [N], rows per expert rank] of the rows sent, or [] when a message does not fit
    its ring now (nothing sent). `rings` int64 [ranks, 2]: (control, data) addresses."""
    return _ops().shm_dispatch(x, ids, weights.float(), num_experts, rings, cap, word, layer, micro_batch, cores)


def shm_expert_layer(counts: torch.Tensor, in_rings: torch.Tensor, out_rings: torch.Tensor, cap: int,
                     w13_packed: torch.Tensor, w2_packed: torch.Tensor, hidden: int, intermediate: int,
                     dtype: torch.dtype, threads: int = 0, w13_scale: torch.Tensor | None = None,
                     w2_scale: torch.Tensor | None = None) -> bool:
    """An expert rank's layer after its header (counts int64 [A, X]): rows in, one SwiGLU output per
    row, outputs back; False when the rows are not all there or a reply does not fit (nothing moved)."""
    return _ops().shm_expert_layer(counts, in_rings, out_rings, cap, w13_packed, w2_packed, hidden, intermediate,
                                   dtype, threads, w13_scale, w2_scale)


def dense(x: torch.Tensor, w_packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [T, K] @ w.T for a weight w [n, K] packed by `prepack(w)`: [T, n] in x's dtype (float32
    accumulation, one rounding)."""
    return _ops().dense(x, w_packed, n)


def decode_layer(x: torch.Tensor, norm1: torch.Tensor, norm2: torch.Tensor, eps: float, qkv_packed: torch.Tensor,
                 qkv_n: int, o_packed: torch.Tensor, o_n: int, heads: int, kv_heads: int, cos: torch.Tensor,
                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 ctx_slots: torch.Tensor, q_pos: torch.Tensor, window: int, scale: float, gate: torch.Tensor, k: int,
                 w13_packed: torch.Tensor, w2_packed: torch.Tensor, intermediate: int,
                 counts: torch.Tensor, w13_scale: torch.Tensor | None = None,
                 w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One decode layer (one query per sequence, x [B, D]) of norm, attention and the MoE in one
    call: `model/native_layer.py` says what it computes and when it runs."""
    return _ops().decode_layer(x, norm1, norm2, eps, qkv_packed, qkv_n, o_packed, o_n, heads, kv_heads, cos, sin,
                               k_cache, v_cache, slots, ctx_slots, q_pos, window, scale, gate, k, w13_packed,
                               w2_packed, intermediate, counts, w13_scale, w2_scale)


def decode_attention_block(x: torch.Tensor, norm1: torch.Tensor, norm2: torch.Tensor, eps: float,
                           qkv_packed: torch.Tensor, qkv_n: int, o_packed: torch.Tensor, o_n: int, heads: int,
                           kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slots: torch.Tensor, ctx_slots: torch.Tensor, q_pos: torch.Tensor,
                           window: int, scale: float, gate: torch.Tensor, k: int,
                           counts: torch.Tensor) -> list[torch.Tensor]:
    """The attention half of a decode layer and its routing in one call: [h, norm2(h), ids [B, K],
    weights [B, K]] (`model/native_layer.py`)."""
    return _ops().decode_attention_block(x, norm1, norm2, eps, qkv_packed, qkv_n, o_packed, o_n, heads, kv_heads,
                                         cos, sin, k_cache, v_cache, slots, ctx_slots, q_pos, window, scale, gate, k,
                                         counts)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx_slots: torch.Tensor,
                     q_pos: torch.Tensor, window: int | None = 0, scale: float | None = None) -> torch.Tensor:
    """One decode step's attention (one query token per sequence) read straight from one layer's
    cache: q [B, H, Dh] (rotary applied), k_cache / v_cache [S, G, Dh] (`cache.k[layer]`, q's dtype),
    ctx_slots [B, L] int64 (the slot of each context position), q_pos [B] int64 (row b attends
    positions 0..q_pos[b], and with a window only those > q_pos[b] - window; ctx_slots past q_pos[b]
    are ignored). Query head h reads KV head h // (H/G). Scores and softmax in float32 -> [B, H, Dh]
    in q's dtype. window None or 0: no sliding window; scale None: Dh**-0.5."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops().decode_attention(q, k_cache, v_cache, ctx_slots, q_pos, int(window or 0), float(scale))


def rotary_cache_write(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """RoPE and the KV-cache write of one layer in one call: qkv [T, (H + 2G) * Dh] (contiguous, the
    qkv product's output, float32 or bfloat16) holds q, k, v heads in that order; cos / sin [T, Dh]
    (qkv's dtype, `Rotary.cos_sin`); k_cache / v_cache [S, G, Dh] (`cache.k[layer]`, contiguous,
    qkv's dtype) get k_cache[slots[t]] = rope(k[t]) and v_cache[slots[t]] = v[t] in place, slots [T]
    int64 in [0, S). Returns rope(q) [T, H, Dh]. Rotate-half RoPE (`rope.apply_rotary`) in float32:
    float32 matches the torch path exactly, bfloat16 rounds once instead of three times."""
    return _ops().rotary_cache_write(qkv, num_heads, num_kv_heads, cos, sin, k_cache, v_cache, slots)


def set_tuning(gate_rows: int = 0, down_rows: int = 0, row_block: int = 96, blocks_per_task: int = 8,
               k_slice: int = 64, slice_max_tiles: int = 4, prefetch: bool = True, stream_prefetch: int = 4096,
               q8_dequant_rows: int = -1, q4_dequant_rows: int = -1) -> None:
    """The driver's knobs (csrc/dispatch.h, whose defaults these repeat): row tiles of the gate/up
    and down products (0: the register tile's maximum), rows per task for experts with many rows,
    32-column blocks per task, the K slice of tasks with 2..slice_max_tiles row tiles (0: none),
    their prefetch of the next slice, the prefetch distance (bytes) of one-tile tasks, and the rows
    above which an int8 (int4) task dequantizes its block and runs the float kernels (-1: the
    running kernels' own crossover, per activation dtype).
    bench/moe_kernels.py --sweep times the alternatives."""
    _ops().set_tuning(gate_rows, down_rows, row_block, blocks_per_task, k_slice, slice_max_tiles, bool(prefetch),
                      stream_prefetch, q8_dequant_rows, q4_dequant_rows)


def tuning() -> dict[str, int]:
    """The knobs set_tuning takes, then the register-tile maxima of the running ISA (max_*)."""
    names = ("gate_rows", "down_rows", "row_block", "blocks_per_task", "k_slice", "slice_max_tiles", "prefetch",
             "stream_prefetch", "q8_dequant_rows", "q4_dequant_rows", "max_gate_rows_f32", "max_down_rows_f32",
             "max_gate_rows_bf16", "max_down_rows_bf16")
    return dict(zip(names, _ops().get_tuning(), strict=True))
