// The micro-kernel table every ISA translation unit fills in, and the packed weight layout.
//
// This header is included by translation units compiled with different -m flags, so it holds
// declarations and plain structs only: no inline functions, no function templates (an inline
// function instantiated in an AVX-512 unit could be the copy the linker keeps for the generic one).
//
// Packed layout (one format for every ISA, see pack.cpp):
//   float32, plain  [X][ceil(N/32)][K][32]         w2: N = D output columns, K = F
//   float32, gated  [X][ceil(F/32)][K][64]         w13: per k-row [gate 32 cols | up 32 cols]
//   bfloat16, plain [X][ceil(N/32)][ceil(K/2)][32][2]   k pairs adjacent (VNNI), zero padded
//   bfloat16, gated [X][ceil(F/32)][ceil(K/2)][64][2]
//   int8,     plain [X][ceil(N/32)][K][32]  and  gated [X][ceil(F/32)][K][64]  (the float32 order),
//             with float32 scales per output column: [X][ceil(N/32) * 32] (plain), [X][ceil(F/32)][64]
//             (gated: 32 gate then 32 up scales per block, as the columns)
//   int4,     plain [X][ceil(N/32)][K][16] and gated [X][ceil(F/32)][K][32] bytes: per 32-column half of a
//             k-row, byte j holds column j (low nibble) and column j + 16 (high), codes u = q + 8 in [0, 15];
//             with float32 scales and biases per (group of G k-rows, column): [X][ceil(N/32)][K/G][2][32]
//             plain, [X][ceil(F/32)][K/G][2][64] gated (the block's scales, then its biases b = -(8 + zero) *
//             scale, so a weight is u * scale + b)
// Columns past N (or F) and the odd k past K are zeros, so padded outputs come out as 0.
//
// In halves (the kernel set's f32_halves / bf16_halves; AVX2): each block's k-rows (pairs) cut
// in two halves held one after the other, so a 16-column pass streams one contiguous half
// instead of every other cache line of the k-rows (2-core AMD EPYC: two rows of gate/up
// 22 -> 27.5 GB/s):
//   float32, plain  [X][ceil(N/32)][2][K][16]      half h: columns 16h .. 16h + 15
//   float32, gated  [X][ceil(F/32)][2][K][32]      half h: [gate 16h .. 16h + 15 | up 16h .. 16h + 15]
//   bfloat16, plain [X][ceil(N/32)][2][ceil(K/2)][16][2]   and  gated [X][ceil(F/32)][2][ceil(K/2)][32][2]
// (int8 and int4 codes keep the one-k-row order above.)
#pragma once

#include <cstdint>

namespace moe_serve {

using bf16_t = uint16_t;

constexpr int kBlock = 32;  // output columns per packed block (per half, for gated blocks)

// One register-tile product: m rows of activations a (stride lda) times one packed block, over
// k columns of a starting at a[0] (w points at the matching k-row of the block; for bfloat16 k is
// even unless the slice ends the row, and an odd k needs a zero at column k of every row).
// Partial sums live in `acc` (float32) between K slices: `load` starts from them instead of 0.
// gate/up: acc is [m][64] (stride 64); `finish` writes h[r][0:32] = silu(gate) * up in the
// activation dtype instead of storing acc. down: acc is y[r][0:32] (stride ldacc), always stored.
// prefetch: elements past w where prefetching starts (0: none); one k-row (pair) of the block is
// pulled towards L2 every `prefetch_every` k-rows (pairs) computed, walking forward from there.
// half (layout in halves): w points at the k-row (pair) in the first half, w + half at the same k-row
// of the second; the prefetch walk runs in both.
template <typename T>
struct Tile {
  const T* a;
  int64_t lda;
  int m, k;
  const T* w;
  int64_t prefetch;
  int prefetch_every;
  float* acc;
  int64_t ldacc;
  bool load, finish;
  T* h;  // gate/up only
  int64_t ldh;
  int64_t half = 0;  // halves layout: elements from a k-row's first half to its second (0: whole k-rows)
};

// An int8 weight-only product (symmetric, one scale per output column): m rows of activations a
// (float32 or bfloat16, stride lda) times one int8 packed block over the whole K, the codes widened
// to float32 in registers and the column scales applied once at the end. gate/up: h[r][0:32] =
// silu(scale_g * gate) * (scale_u * up) in the activation dtype; down: acc[r][0:32] = scale * sum
// (stride ldacc). prefetch: bytes past w where an L2 prefetch walk starts (0: none), one k-row
// pulled per k-row computed.
template <typename T>
struct TileQ8 {
  const T* a;
  int64_t lda;
  int m, k;
  const int8_t* w;
  const float* scale;  // the block's 64 (gate/up) or 32 (down) column scales
  int64_t prefetch;
  float* acc;
  int64_t ldacc;
  T* h;
  int64_t ldh;
};
using GateUpQ8F32 = void (*)(const TileQ8<float>& t);
using GateUpQ8BF16 = void (*)(const TileQ8<bf16_t>& t);
using DownQ8F32 = void (*)(const TileQ8<float>& t);
using DownQ8BF16 = void (*)(const TileQ8<bf16_t>& t);

// An int4 weight-only product (asymmetric, a scale and a zero point per group of `group` inputs and
// output column, kernels.h's layout above): m rows of activations a times one int4 packed block over
// the whole K (a multiple of `group`), every code widened to float32 and dequantized in registers with
// one fused multiply-add (u * scale + bias) before the FMAs of the float32 kernels. gate/up and down
// write as TileQ8's do. prefetch: bytes past w where an L2 prefetch walk starts (0: none).
template <typename T>
struct TileQ4 {
  const T* a;
  int64_t lda;
  int m, k, group;
  const uint8_t* w;
  const float* sb;  // the block's [k / group][2][width]: scales, then biases
  int64_t prefetch;
  float* acc;
  int64_t ldacc;
  T* h;
  int64_t ldh;
};
using GateUpQ4F32 = void (*)(const TileQ4<float>& t);
using GateUpQ4BF16 = void (*)(const TileQ4<bf16_t>& t);
using DownQ4F32 = void (*)(const TileQ4<float>& t);
using DownQ4BF16 = void (*)(const TileQ4<bf16_t>& t);
// One int4 block (k rows of `width` columns) dequantized into the float32 or the bfloat16 VNNI layout
// (one rounding to bfloat16 from the float32 u * scale + bias).
using DequantQ4F32 = void (*)(const uint8_t* w, int k, int width, const float* sb, int group, float* out);
using DequantQ4BF16 = void (*)(const uint8_t* w, int k, int width, const float* sb, int group, bf16_t* out);

// One int8 block (k rows of `width` codes, packed order) dequantized with its column scales into the
// float32 layout (out[kk][j] = w * scale[j], one rounding) or the bfloat16 VNNI layout (k pairs,
// rounded once, the odd k past the end zero): tasks with many rows run the float kernels on it.
using DequantF32 = void (*)(const int8_t* w, int k, int width, const float* scale, float* out);
using DequantBF16 = void (*)(const int8_t* w, int k, int width, const float* scale, bf16_t* out);

using GateUpF32 = void (*)(const Tile<float>& t);
using GateUpBF16 = void (*)(const Tile<bf16_t>& t);
using DownF32 = void (*)(const Tile<float>& t);
using DownBF16 = void (*)(const Tile<bf16_t>& t);
// out[0:d] = sum_i wts[i] * ys[i][0:d] (wts null: weight 1), summed in float32; n == 0 gives zeros.
using CombineF32 = void (*)(float* out, const float* const* ys, const float* wts, int n, int d);
using CombineBF16 = void (*)(bf16_t* out, const float* const* ys, const float* wts, int n, int d);

// Decode attention over one chunk of one KV head's context (attention.cpp splits the work): the
// r query rows q[i][0:dh] (row stride dh, q's dtype) against the n >= 1 positions whose cache
// slots are slots[0:n], K and V of slot s at k + s * stride and v + s * stride. Scores
// (q . k) * scale and the softmax in float32, one pass (online softmax over blocks of positions):
// writes the chunk's max score m_i and sum l_i of exp(score - m_i) to ml[2i] and ml[2i + 1], and
// acc[i][0:dh] = sum exp(score - m_i) v (row stride ldacc, a multiple of 16 >= dh; the columns
// past dh are written as zeros). r <= kAttnRows, dh <= kAttnMaxDh.
constexpr int kAttnRows = 16, kAttnMaxDh = 512;
template <typename T>
struct AttnChunk {
  const T* q;
  int r, dh;
  float scale;
  const T* k;
  const T* v;
  int64_t stride;
  const int64_t* slots;
  int n;
  float* ml;
  float* acc;
  int64_t ldacc;
};
using AttnF32 = void (*)(const AttnChunk<float>& c);
using AttnBF16 = void (*)(const AttnChunk<bf16_t>& c);

// Rotate-half RoPE of `rows` contiguous head rows x[r][0:dh] (dh even) sharing one token's
// cos[0:dh] / sin[0:dh], into out[r][0:dh] (contiguous): x * cos + cat(-x[h:], x[:h]) * sin in
// float32 with that operation order and no fused multiply-add (rope_impl.h); bfloat16 rounded once.
using RopeF32 = void (*)(const float* x, int rows, int dh, const float* cos, const float* sin, float* out);
using RopeBF16 = void (*)(const bf16_t* x, int rows, int dh, const bf16_t* cos, const bf16_t* sin, bf16_t* out);

struct Kernels {
  const char* name;
  int gate_rows_f32, gate_rows_bf16;  // largest m each kernel takes (its register tile)
  int down_rows_f32, down_rows_bf16;
  GateUpF32 gate_up_f32;
  GateUpBF16 gate_up_bf16;
  DownF32 down_f32;
  DownBF16 down_bf16;
  CombineF32 combine_f32;
  CombineBF16 combine_bf16;
  AttnF32 attn_f32;
  AttnBF16 attn_bf16;
  RopeF32 rope_f32;
  RopeBF16 rope_bf16;
  // Whether float32 / bfloat16 weights are packed in halves (the layout above) for these products.
  bool f32_halves = false, bf16_halves = false;
  // Whether tasks of several row tiles cut K into slices (Tuning::k_slice) for the bfloat16
  // products. Not on AMX: its C tiles hold the partial sums over the whole K, and storing and
  // reloading them per slice cost more than the slices save (bench.moe_kernels --sweep).
  bool slice_bf16 = true;
  // The int8 weight-only products (null: this ISA has none, and the int8 experts stay on torch's
  // weight-only kernels).
  int gate_rows_q8 = 0, down_rows_q8 = 0;
  GateUpQ8F32 gate_up_q8_f32 = nullptr;
  GateUpQ8BF16 gate_up_q8_bf16 = nullptr;
  DownQ8F32 down_q8_f32 = nullptr;
  DownQ8BF16 down_q8_bf16 = nullptr;
  DequantF32 dequant_f32 = nullptr;
  DequantBF16 dequant_bf16 = nullptr;
  // Rows above which an int8 task dequantizes its block for the float kernels instead (the
  // crossover bench.int8_kernels measures for these products), float32 and bfloat16 activations.
  int q8_dequant_rows_f32 = 16, q8_dequant_rows_bf16 = 16;
  // The int4 weight-only products (null: none, and int4 experts stay on torch's kernels).
  int gate_rows_q4 = 0, down_rows_q4 = 0;
  // Rows above which an int4 task dequantizes its block for the float kernels instead (the
  // crossover bench.int4_kernels measures for these products), float32 and bfloat16 activations.
  int q4_dequant_rows_f32 = 0, q4_dequant_rows_bf16 = 0;
  GateUpQ4F32 gate_up_q4_f32 = nullptr;
  GateUpQ4BF16 gate_up_q4_bf16 = nullptr;
  DownQ4F32 down_q4_f32 = nullptr;
  DownQ4BF16 down_q4_bf16 = nullptr;
  DequantQ4F32 dequant_q4_f32 = nullptr;
  DequantQ4BF16 dequant_q4_bf16 = nullptr;
};

// One per translation unit; the AVX-512 BF16 unit only provides the two bfloat16 products.
const Kernels* generic_kernels();
const Kernels* avx2_kernels();  // with the int8 and int4 products
const Kernels* avx512_kernels();  // with the int8 and int4 products
extern const int kAvx512Bf16GateRows, kAvx512Bf16DownRows;
void avx512bf16_gate_up(const Tile<bf16_t>& t);
void avx512bf16_down(const Tile<bf16_t>& t);
void avx512bf16_attn(const AttnChunk<bf16_t>& c);
void avx512bf16_dequant(const int8_t* w, int k, int width, const float* scale, bf16_t* out);
// int4 products with bfloat16 activations on vdpbf16ps (rows as the AVX-512 unit's int4 products).
void avx512bf16_gate_up_q4(const TileQ4<bf16_t>& t);
void avx512bf16_down_q4(const TileQ4<bf16_t>& t);
// The AMX-BF16 unit: the two bfloat16 products on 16-row tiles (fewer rows: the AVX-512 BF16 ones).
extern const int kAmxRows;
void amx_gate_up(const Tile<bf16_t>& t);
void amx_down(const Tile<bf16_t>& t);

}  // namespace moe_serve
