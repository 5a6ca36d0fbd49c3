// The fused RoPE + KV-cache write driver, on raw pointers (no torch: ops.cpp validates the
// tensors, including every slot, and calls this). The row kernel of the selected ISA
// (kernels.h, rope_impl.h) does the arithmetic.
#pragma once

#include <cstdint>

namespace moe_serve {

struct RotaryWriteProblem {
  bool bf16 = false;          // qkv, cos, sin, the caches and q_out: bfloat16 (else float32)
  const void* qkv = nullptr;  // [t][(h + 2g) * dh], contiguous: q heads, then k heads, then v heads
  const void* cos = nullptr;  // [t][dh]
  const void* sin = nullptr;  // [t][dh]
  void* k_cache = nullptr;    // [s][g][dh], one layer, contiguous
  void* v_cache = nullptr;    // [s][g][dh]
  const int64_t* slots = nullptr;  // [t], each in [0, s) (checked by the caller)
  int64_t t = 0, h = 0, g = 0, dh = 0;
  void* q_out = nullptr;  // [t][h][dh]
  int threads = 1;
};

// q_out[i] = rope(q[i]); k_cache[slots[i]] = rope(k[i]); v_cache[slots[i]] = v[i].
void run_rotary_cache_write(const RotaryWriteProblem& p);

}  // namespace moe_serve
