// AVX-512 (F/BW/VL/DQ + FMA) micro-kernels: float32, and bfloat16 widened to float32 in registers
// (the path for AVX-512 CPUs without the BF16 dot product). Compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma; only ever called after a run-time check (dispatch.cpp).
//
// Register tiles: an m x 32 output tile lives in 2m zmm accumulators (w2), m x (32 gate + 32 up) in
// 4m (w13); each packed weight vector is loaded once per k and used by every row of the tile.
#include <algorithm>

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

// int8 weight-only (kernels.h, TileQ8): 16 codes at a time sign-extended to int32 and converted to
// float32 in registers, FMAs as in the float32 kernels, the column scales applied once per tile.
inline __m512 bcast(const float* p) { return _mm512_set1_ps(*p); }
inline __m512 bcast(const bf16_t* p) { return _mm512_castsi512_ps(_mm512_set1_epi32(int32_t(uint32_t(*p) << 16))); }
inline __m512 codes16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void store_h16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_h16(bf16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_512(v)); }

template <int M, bool kPrefetch, typename T>
void gate_up_q8_m(const TileQ8<T>& t) {
  __m512 acc[M][4];
  acc_init<M, 4>(acc, nullptr, 0, false);
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int kk = 0; kk < t.k; ++kk) {
    const int8_t* wk = t.w + int64_t(kk) * 64;
    if (kPrefetch) _mm_prefetch(pf + int64_t(kk) * 64, _MM_HINT_T1);
    const __m512 w0 = codes16(wk), w1 = codes16(wk + 16), w2 = codes16(wk + 32), w3 = codes16(wk + 48);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512 x = bcast(t.a + r * t.lda + kk);
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, w3, acc[r][3]);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(t.scale), s1 = _mm512_loadu_ps(t.scale + 16);
  const __m512 s2 = _mm512_loadu_ps(t.scale + 32), s3 = _mm512_loadu_ps(t.scale + 48);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    store_h16(t.h + r * t.ldh, silu_mul512(_mm512_mul_ps(acc[r][0], s0), _mm512_mul_ps(acc[r][2], s2)));
    store_h16(t.h + r * t.ldh + 16, silu_mul512(_mm512_mul_ps(acc[r][1], s1), _mm512_mul_ps(acc[r][3], s3)));
  }
}

template <int M, bool kPrefetch, typename T>
void down_q8_m(const TileQ8<T>& t) {
  __m512 acc[M][2];
  acc_init<M, 2>(acc, nullptr, 0, false);
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int kk = 0; kk < t.k; ++kk) {
    const int8_t* wk = t.w + int64_t(kk) * 32;
    if (kPrefetch && (kk & 1) == 0) _mm_prefetch(pf + int64_t(kk) * 32, _MM_HINT_T1);
    const __m512 w0 = codes16(wk), w1 = codes16(wk + 16);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512 x = bcast(t.a + r * t.lda + kk);
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(t.scale), s1 = _mm512_loadu_ps(t.scale + 16);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    _mm512_storeu_ps(t.acc + r * t.ldacc, _mm512_mul_ps(acc[r][0], s0));
    _mm512_storeu_ps(t.acc + r * t.ldacc + 16, _mm512_mul_ps(acc[r][1], s1));
  }
}

void dequant_f32(const int8_t* w, int k, int width, const float* scale, float* out) {
  for (int kk = 0; kk < k; ++kk)
    for (int j = 0; j < width; j += 16)
      _mm512_storeu_ps(out + int64_t(kk) * width + j,
                       _mm512_mul_ps(codes16(w + int64_t(kk) * width + j), _mm512_loadu_ps(scale + j)));
}

// The bfloat16 VNNI layout of a block from its rows: row(kk, j, v0, v1) gives columns j..j+31 of
// k-row kk in float32; two k-rows at a time are rounded to bfloat16 and interleaved as (k, k+1)
// pairs, the odd k past the end zero.
template <typename Row>
MOE_INLINE void to_bf16_pairs(int k, int width, bf16_t* out, Row row) {
  const __m512i idx_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                          6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  for (int kk = 0; kk < k; kk += 2) {
    bf16_t* o = out + int64_t(kk / 2) * width * 2;
    for (int j = 0; j < width; j += 32) {
      __m512i rows[2];
      for (int h = 0; h < 2; ++h) {
        __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
        if (kk + h < k) row(kk + h, j, v0, v1);
        rows[h] = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_512(v0)), to_bf16_512(v1), 1);
      }
      _mm512_storeu_si512(o + 2 * j, _mm512_permutex2var_epi16(rows[0], idx_lo, rows[1]));
      _mm512_storeu_si512(o + 2 * j + 32, _mm512_permutex2var_epi16(rows[0], idx_hi, rows[1]));
    }
  }
}

// Two k-rows of 16 columns, scaled, rounded to bfloat16 and interleaved as (k, k+1) pairs.
void dequant_bf16(const int8_t* w, int k, int width, const float* scale, bf16_t* out) {
  to_bf16_pairs(k, width, out, [&](int kk, int j, __m512& v0, __m512& v1) {
    const int8_t* src = w + int64_t(kk) * width + j;
    v0 = _mm512_mul_ps(codes16(src), _mm512_loadu_ps(scale + j));
    v1 = _mm512_mul_ps(codes16(src + 16), _mm512_loadu_ps(scale + j + 16));
  });
}

// int4 weight-only (kernels.h, TileQ4): 16 bytes give 32 columns (the low nibbles columns 0..15,
// the high ones 16..31), widened to int32, converted to float32 and dequantized with the group's
// scale and bias in one FMA; the FMAs of the float32 kernels follow. The scales and biases of a
// group stay in registers across its k-rows.
MOE_INLINE void nibbles32(const uint8_t* p, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

template <int M, bool kPrefetch, typename T>
void gate_up_q4_m(const TileQ4<T>& t) {
  __m512 acc[M][4];
  acc_init<M, 4>(acc, nullptr, 0, false);
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int g0 = 0; g0 < t.k; g0 += t.group) {
    const float* sb = t.sb + int64_t(g0 / t.group) * 128;
    __m512 s[4], b[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) s[j] = _mm512_loadu_ps(sb + 16 * j), b[j] = _mm512_loadu_ps(sb + 64 + 16 * j);
    const int end = std::min(g0 + t.group, t.k);
    for (int kk = g0; kk < end; ++kk) {
      const uint8_t* wk = t.w + int64_t(kk) * 32;
      if (kPrefetch && (kk & 1) == 0) _mm_prefetch(pf + int64_t(kk) * 32, _MM_HINT_T1);
      __m512 w[4];
      nibbles32(wk, w[0], w[1]);
      nibbles32(wk + 16, w[2], w[3]);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) w[j] = _mm512_fmadd_ps(w[j], s[j], b[j]);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512 x = bcast(t.a + r * t.lda + kk);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(x, w[j], acc[r][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    store_h16(t.h + r * t.ldh, silu_mul512(acc[r][0], acc[r][2]));
    store_h16(t.h + r * t.ldh + 16, silu_mul512(acc[r][1], acc[r][3]));
  }
}

template <int M, bool kPrefetch, typename T>
void down_q4_m(const TileQ4<T>& t) {
  __m512 acc[M][2];
  acc_init<M, 2>(acc, nullptr, 0, false);
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int g0 = 0; g0 < t.k; g0 += t.group) {
    const float* sb = t.sb + int64_t(g0 / t.group) * 64;
    const __m512 s0 = _mm512_loadu_ps(sb), s1 = _mm512_loadu_ps(sb + 16);
    const __m512 b0 = _mm512_loadu_ps(sb + 32), b1 = _mm512_loadu_ps(sb + 48);
    const int end = std::min(g0 + t.group, t.k);
    for (int kk = g0; kk < end; ++kk) {
      if (kPrefetch && (kk & 3) == 0) _mm_prefetch(pf + int64_t(kk) * 16, _MM_HINT_T1);
      __m512 w0, w1;
      nibbles32(t.w + int64_t(kk) * 16, w0, w1);
      w0 = _mm512_fmadd_ps(w0, s0, b0);
      w1 = _mm512_fmadd_ps(w1, s1, b1);
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) {
        const __m512 x = bcast(t.a + r * t.lda + kk);
        acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
      }
    }
  }
  acc_store<M, 2>(acc, t.acc, t.ldacc);
}

// One int4 block dequantized: float32 rows of `width` columns, or bfloat16 (k, k+1) pairs (k even).
void dequant_q4_f32(const uint8_t* w, int k, int width, const float* sb, int group, float* out) {
  for (int kk = 0; kk < k; ++kk) {
    const float* s = sb + int64_t(kk / group) * 2 * width;
    for (int j = 0; j < width; j += 32) {
      __m512 lo, hi;
      nibbles32(w + (int64_t(kk) * width + j) / 2, lo, hi);
      float* o = out + int64_t(kk) * width + j;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(lo, _mm512_loadu_ps(s + j), _mm512_loadu_ps(s + width + j)));
      _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(hi, _mm512_loadu_ps(s + j + 16), _mm512_loadu_ps(s + width + j + 16)));
    }
  }
}

void dequant_q4_bf16(const uint8_t* w, int k, int width, const float* sb, int group, bf16_t* out) {
  to_bf16_pairs(k, width, out, [&](int kk, int j, __m512& v0, __m512& v1) {
    const float* s = sb + int64_t(kk / group) * 2 * width;
    nibbles32(w + (int64_t(kk) * width + j) / 2, v0, v1);
    v0 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(s + j), _mm512_loadu_ps(s + width + j));
    v1 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(s + j + 16), _mm512_loadu_ps(s + width + j + 16));
  });
}

template <int M, bool kPrefetch>
void gate_up_q4_f32_m(const TileQ4<float>& t) { gate_up_q4_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void gate_up_q4_bf16_m(const TileQ4<bf16_t>& t) { gate_up_q4_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void down_q4_f32_m(const TileQ4<float>& t) { down_q4_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void down_q4_bf16_m(const TileQ4<bf16_t>& t) { down_q4_m<M, kPrefetch>(t); }

constexpr int kGateRowsQ4 = 4, kDownRowsQ4 = 8;
void gate_up_q4_f32(const TileQ4<float>& t) { MOE_ROWS_SWITCH_4(gate_up_q4_f32_m, t) }
void gate_up_q4_bf16(const TileQ4<bf16_t>& t) { MOE_ROWS_SWITCH_4(gate_up_q4_bf16_m, t) }
void down_q4_f32(const TileQ4<float>& t) { MOE_ROWS_SWITCH_8(down_q4_f32_m, t) }
void down_q4_bf16(const TileQ4<bf16_t>& t) { MOE_ROWS_SWITCH_8(down_q4_bf16_m, t) }

template <int M, bool kPrefetch>
void gate_up_q8_f32_m(const TileQ8<float>& t) { gate_up_q8_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void gate_up_q8_bf16_m(const TileQ8<bf16_t>& t) { gate_up_q8_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void down_q8_f32_m(const TileQ8<float>& t) { down_q8_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void down_q8_bf16_m(const TileQ8<bf16_t>& t) { down_q8_m<M, kPrefetch>(t); }

void gate_up_q8_f32(const TileQ8<float>& t) { MOE_ROWS_SWITCH_6(gate_up_q8_f32_m, t) }
void gate_up_q8_bf16(const TileQ8<bf16_t>& t) { MOE_ROWS_SWITCH_6(gate_up_q8_bf16_m, t) }
void down_q8_f32(const TileQ8<float>& t) { MOE_ROWS_SWITCH_12(down_q8_f32_m, t) }
void down_q8_bf16(const TileQ8<bf16_t>& t) { MOE_ROWS_SWITCH_12(down_q8_bf16_m, t) }

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

const Kernels kTable = [] {
  Kernels t = {"avx512",     kGateRowsF32, kGateRowsBF16, kDownRowsF32, kDownRowsBF16, gate_up_f32,
               gate_up_bf16, down_f32,     down_bf16,     combine_f32,  combine_bf16,  attn_f32,
               attn_bf16,    rope_f32,     rope_bf16};
  t.gate_rows_q8 = kGateRowsF32;
  t.down_rows_q8 = kDownRowsF32;
  t.gate_up_q8_f32 = gate_up_q8_f32;
  t.gate_up_q8_bf16 = gate_up_q8_bf16;
  t.down_q8_f32 = down_q8_f32;
  t.down_q8_bf16 = down_q8_bf16;
  t.dequant_f32 = dequant_f32;
  t.dequant_bf16 = dequant_bf16;
  t.gate_rows_q4 = kGateRowsQ4;
  t.down_rows_q4 = kDownRowsQ4;
  t.q4_dequant_rows_f32 = t.q4_dequant_rows_bf16 = 12;  // the crossover: 12-16 rows (Zen 4)
  t.gate_up_q4_f32 = gate_up_q4_f32;
  t.gate_up_q4_bf16 = gate_up_q4_bf16;
  t.down_q4_f32 = down_q4_f32;
  t.down_q4_bf16 = down_q4_bf16;
  t.dequant_q4_f32 = dequant_q4_f32;
  t.dequant_q4_bf16 = dequant_q4_bf16;
  return t;
}();

}  // namespace

const Kernels* avx512_kernels() { return &kTable; }

}  // namespace moe_serve
