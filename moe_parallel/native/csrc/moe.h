// The MoE driver and the weight packing, on raw pointers (no torch: ops.cpp validates tensors
// and calls these). Layouts in kernels.h.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace moe_serve {

// Packs w [X][N][K] (row-major, contiguous) into the blocked layout; gated: N = 2F, the w1 and w3
// halves interleaved per 32-column block (`halves`: kernels.h's layout in halves). `out` holds
// packed_numel() elements.
int64_t packed_numel(int64_t x, int64_t n, int64_t k, bool gated, bool bf16);
void pack_f32(const float* w, float* out, int64_t x, int64_t n, int64_t k, bool gated, int threads, bool halves);
void pack_bf16(const bf16_t* w, bf16_t* out, int64_t x, int64_t n, int64_t k, bool gated, int threads, bool halves);
void pack_i8(const int8_t* w, int8_t* out, int64_t x, int64_t n, int64_t k, bool gated, int threads);
// Scales [X][N] float32 of w [X][N][K] in the packed column order: [X][ceil(N/32) * 32] plain,
// [X][ceil(F/32)][64] gated (N = 2F: 32 gate then 32 up per block); padding columns get 0.
int64_t packed_scale_numel(int64_t x, int64_t n, bool gated);
void pack_scales(const float* s, float* out, int64_t x, int64_t n, bool gated);
// int4: signed codes q [X][N][K] in [-8, 7] into the nibble layout of kernels.h ([X][blocks][K][width / 2]
// bytes), and their scales s and zero points z [X][N][K/G] (z null: symmetric, 0) into the packed
// [X][blocks][K/G][2][width] scales and biases.
void pack_i4(const int8_t* w, uint8_t* out, int64_t x, int64_t n, int64_t k, bool gated, int threads);
void pack_q4_scales(const float* s, const int8_t* z, float* out, int64_t x, int64_t n, int64_t groups, bool gated);

struct MoeProblem {
  bool bf16 = false;        // x, weights and out: bfloat16 (else float32)
  const void* x = nullptr;  // [tokens][d], contiguous
  int64_t tokens = 0, d = 0, f = 0;
  const void* ids = nullptr;  // [tokens][topk] expert ids, int32 or int64
  bool ids64 = false;
  int64_t topk = 1;
  const float* weights = nullptr;  // [tokens][topk] router weights; null: weight 1 (the rows variant)
  int64_t first_expert = 0, num_experts = 0;  // ids outside [first, first + num) are skipped
  const void* w13 = nullptr;  // gated packed [X][ceil(f/32)][...]
  const void* w2 = nullptr;   // plain packed [X][ceil(d/32)][...]
  // int8 weight-only experts: w13 / w2 hold int8 codes (float32 layout) and these their column
  // scales in the packed order (pack_scales); x and out stay float32 or bfloat16.
  bool q8 = false;
  const float* s13 = nullptr;
  const float* s2 = nullptr;
  // int4 weight-only experts (q4_group > 0: the group size along K): w13 / w2 hold int4 codes and
  // s13 / s2 their packed scales and biases (pack_q4_scales).
  int64_t q4_group = 0;
  void* out = nullptr;        // [tokens][d]
  int threads = 1;
};

// Runs the layer; returns how many (token, k) pairs were skipped as outside the local range.
int64_t run_moe(const MoeProblem& p);

// A dense product out = x w^T on one plain-packed weight (w [n][k] packed as [1][ceil(n/32)][...]),
// through the same down micro-kernel and task split as the MoE layer: every weight block is read
// once per row block. x [rows][k] contiguous (k even for bfloat16), out [rows][n] in x's dtype.
struct DenseProblem {
  bool bf16 = false;
  const void* x = nullptr;
  int64_t rows = 0, k = 0, n = 0;
  const void* w = nullptr;
  void* out = nullptr;
  int threads = 1;
};
void run_dense(const DenseProblem& p);

}  // namespace moe_serve
