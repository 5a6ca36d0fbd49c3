// The decode-attention driver, on raw pointers (no torch: ops.cpp validates the tensors and calls
// this). One query token per sequence; the chunk kernel of the selected ISA (kernels.h,
// attn_impl.h) does the arithmetic.
#pragma once

#include <cstdint>

namespace moe_serve {

struct DecodeAttnProblem {
  bool bf16 = false;         // q, the caches and out: bfloat16 (else float32)
  const void* q = nullptr;   // [b][h][dh], contiguous
  const void* k = nullptr;   // [s][g][dh], one layer's cache, contiguous
  const void* v = nullptr;   // [s][g][dh]
  int64_t b = 0, h = 0, g = 1, dh = 0, l = 0, s = 0;
  const int64_t* ctx_slots = nullptr;  // [b][l]: the cache slot of each context position
  const int64_t* q_pos = nullptr;      // [b], each in [0, l): row i attends positions 0..q_pos[i]
  int64_t window = 0;                  // > 0: only positions j > q_pos - window
  float scale = 1.0f;
  void* out = nullptr;  // [b][h][dh]
  int threads = 1;
};

// Runs it; returns -1, or the first index b * l + j of ctx_slots (among the attended positions)
// whose slot is outside [0, s): then nothing is read there and out is left undefined.
int64_t run_decode_attention(const DecodeAttnProblem& p);

}  // namespace moe_serve
