"""Native CPU kernels of the MoE layer (C++/OpenMP, csrc/), built ahead of time and optional.

    from moe_parallel import native
    if native.available():
        w13p, w2p = native.prepack(w13, gated=True), native.prepack(w2)      # once, at load
        out = native.fused_moe(x, topk_ids, topk_weights, w13p, w2p, first_expert, X, F)
    else:
        ...  # the torch path; native.reason() says why

Weights go in as the stacked [X, 2F, D] / [X, D, F] tensors the experts already hold and come
out packed in 32-column blocks; x, routing and the packed weights go into one call that returns
the layer's output (or, `fused_experts_rows`, one row per routed row). `decode_attention` is one
decode step's attention for one layer, read from the KV cache through the context's slots;
`rotary_cache_write` applies RoPE to q and k of the qkv product and writes k, v into the cache. See kernels.py for the
MOE_SERVE_KERNELS switch and build.py for building the library.
"""

from moe_parallel.native.kernels import (
    available,
    combine_rows,
    decode_attention,
    decode_attention_block,
    decode_layer,
    dense,
    force,
    fused_experts_rows,
    fused_moe,
    gate_up,
    halves,
    has_q4,
    has_q8,
    isa,
    packed_shape,
    prepack,
    prepack_into,
    prepack_q4,
    prepack_q4_into,
    prepack_q4_scales,
    prepack_scales,
    q4_packed_shape,
    q4_scale_shape,
    reason,
    rotary_cache_write,
    scale_shape,
    set_tuning,
    shm_dispatch,
    shm_expert_layer,
    supported_isas,
    torch_forced,
    tuning,
)

__all__ = ["available", "combine_rows", "decode_attention", "decode_attention_block", "decode_layer", "dense",
           "force", "fused_experts_rows", "fused_moe", "gate_up", "halves", "has_q4", "has_q8", "isa",
           "packed_shape", "prepack", "prepack_into", "prepack_q4", "prepack_q4_into", "prepack_q4_scales",
           "prepack_scales", "q4_packed_shape", "q4_scale_shape", "reason", "rotary_cache_write", "scale_shape",
           "set_tuning", "shm_dispatch", "shm_expert_layer", "supported_isas", "torch_forced", "tuning"]
