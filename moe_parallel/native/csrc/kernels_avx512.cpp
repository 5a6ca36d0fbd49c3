// AVX-512 (F/BW/VL/DQ + FMA) micro-kernels: float32, and bfloat16 widened to float32 in registers
// (the path for AVX-512 CPUs without the BF16 dot product). Compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma; only ever called after a run-time check (dispatch.cpp).
//
// Register tiles: an m x 32 output tile lives in 2m zmm accumulators (w2), m x (32 gate + 32 up) in
// 4m (w13); each packed weight vector is loaded once per k and used by every row of the tile.
#include "attn_impl.h"
#include "kernels.h"
#include "rope_impl.h"
#include "simd_avx512.h"

namespace moe_serve {
namespace {

constexpr int kGateRowsF32 = 6, kDownRowsF32 = 12, kGateRowsBF16 = 5, kDownRowsBF16 = 10;

template <int M, bool kPrefetch>
void gate_up_f32_m(const Tile<float>& t) {
  __m512 acc[M][4];
  acc_init<M, 4>(acc, t.acc, 64, t.load);
  const float* a = t.a;
  MOE_PREFETCH_START
  for (int kk = 0; kk < t.k; ++kk) {
    const float* wk = t.w + int64_t(kk) * 64;
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_l2<256>(pf);
      pf += 256;
    }
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    const __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * t.lda + kk]);
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, w3, acc[r][3]);
    }
  }
  if (!t.finish) return acc_store<M, 4>(acc, t.acc, 64);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    _mm512_storeu_ps(t.h + r * t.ldh, silu_mul512(acc[r][0], acc[r][2]));
    _mm512_storeu_ps(t.h + r * t.ldh + 16, silu_mul512(acc[r][1], acc[r][3]));
  }
}

template <int M, bool kPrefetch>
void down_f32_m(const Tile<float>& t) {
  __m512 acc[M][2];
  acc_init<M, 2>(acc, t.acc, t.ldacc, t.load);
  MOE_PREFETCH_START
  for (int kk = 0; kk < t.k; ++kk) {
    const float* wk = t.w + int64_t(kk) * 32;
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_l2<128>(pf);
      pf += 128;
    }
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(t.a[r * t.lda + kk]);
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
    }
  }
  acc_store<M, 2>(acc, t.acc, t.ldacc);
}

// A zmm of packed bf16 holds 16 columns x (k, k+1); shifting / masking gives the k and k+1 floats.
inline __m512 even_f32(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 odd_f32(__m512i v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))); }
inline __m512i pair_at(const bf16_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

template <int M, bool kPrefetch>
void gate_up_bf16_m(const Tile<bf16_t>& t) {
  __m512 acc[M][4];
  acc_init<M, 4>(acc, t.acc, 64, t.load);
  const int pairs = (t.k + 1) / 2;
  MOE_PREFETCH_START
  for (int p = 0; p < pairs; ++p) {
    const bf16_t* wk = t.w + int64_t(p) * 128;
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_l2<256>(pf);
      pf += 256;
    }
    __m512 we[4], wo[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(wk + 32 * j);
      we[j] = even_f32(v);
      wo[j] = odd_f32(v);
    }
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512i x = pair_at(t.a + r * t.lda + 2 * p);
      const __m512 xe = even_f32(x), xo = odd_f32(x);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xo, wo[j], _mm512_fmadd_ps(xe, we[j], acc[r][j]));
    }
  }
  if (!t.finish) return acc_store<M, 4>(acc, t.acc, 64);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    bf16_t* h = t.h + r * t.ldh;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), to_bf16_512(silu_mul512(acc[r][0], acc[r][2])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + 16), to_bf16_512(silu_mul512(acc[r][1], acc[r][3])));
  }
}

template <int M, bool kPrefetch>
void down_bf16_m(const Tile<bf16_t>& t) {
  __m512 acc[M][2];
  acc_init<M, 2>(acc, t.acc, t.ldacc, t.load);
  const int pairs = (t.k + 1) / 2;
  MOE_PREFETCH_START
  for (int p = 0; p < pairs; ++p) {
    const bf16_t* wk = t.w + int64_t(p) * 64;
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_l2<128>(pf);
      pf += 128;
    }
    const __m512i v0 = _mm512_loadu_si512(wk), v1 = _mm512_loadu_si512(wk + 32);
    const __m512 we0 = even_f32(v0), wo0 = odd_f32(v0), we1 = even_f32(v1), wo1 = odd_f32(v1);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512i x = pair_at(t.a + r * t.lda + 2 * p);
      const __m512 xe = even_f32(x), xo = odd_f32(x);
      acc[r][0] = _mm512_fmadd_ps(xo, wo0, _mm512_fmadd_ps(xe, we0, acc[r][0]));
      acc[r][1] = _mm512_fmadd_ps(xo, wo1, _mm512_fmadd_ps(xe, we1, acc[r][1]));
    }
  }
  acc_store<M, 2>(acc, t.acc, t.ldacc);
}

void gate_up_f32(const Tile<float>& t) { MOE_ROWS_SWITCH_6(gate_up_f32_m, t) }
void down_f32(const Tile<float>& t) { MOE_ROWS_SWITCH_12(down_f32_m, t) }
void gate_up_bf16(const Tile<bf16_t>& t) { MOE_ROWS_SWITCH_6(gate_up_bf16_m, t) }
void down_bf16(const Tile<bf16_t>& t) { MOE_ROWS_SWITCH_12(down_bf16_m, t) }

void combine_f32(float* out, const float* const* ys, const float* wts, int n, int d) {
  for (int j = 0; j < d; j += 16) {
    const __mmask16 mask = tail_mask(d - j);
    _mm512_mask_storeu_ps(out + j, mask, combine_at(ys, wts, n, j, mask));
  }
}

void combine_bf16(bf16_t* out, const float* const* ys, const float* wts, int n, int d) {
  for (int j = 0; j < d; j += 16) {
    const __mmask16 mask = tail_mask(d - j);
    _mm256_mask_storeu_epi16(out + j, mask, to_bf16_512(combine_at(ys, wts, n, j, mask)));
  }
}

// RoPE rows (rope_impl.h): the attention policy plus bfloat16 and masked stores.
struct R512 : V512 {
  using V512::store;
  static void store(bf16_t* p, vec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_512(v)); }
  static void store_part(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
  static void store_part(bf16_t* p, vec v, int n) { _mm256_mask_storeu_epi16(p, tail_mask(n), to_bf16_512(v)); }
};

void rope_f32(const float* x, int rows, int dh, const float* c, const float* s, float* out) {
  rope_rows<R512>(x, rows, dh, c, s, out);
}
void rope_bf16(const bf16_t* x, int rows, int dh, const bf16_t* c, const bf16_t* s, bf16_t* out) {
  rope_rows<R512>(x, rows, dh, c, s, out);
}

void attn_f32(const AttnChunk<float>& c) { attn_chunk<V512>(c); }
void attn_bf16(const AttnChunk<bf16_t>& c) { attn_chunk<V512>(c); }

const Kernels kTable = {"avx512",     kGateRowsF32, kGateRowsBF16, kDownRowsF32, kDownRowsBF16, gate_up_f32,
                        gate_up_bf16, down_f32,     down_bf16,     combine_f32,  combine_bf16,  attn_f32,
                        attn_bf16,    rope_f32,     rope_bf16};

}  // namespace

const Kernels* avx512_kernels() { return &kTable; }

}  // namespace moe_serve
