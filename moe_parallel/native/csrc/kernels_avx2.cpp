// AVX2 + FMA micro-kernels (float32, bfloat16 widened to float32 in registers, int8 and int4
// weight-only codes widened the same way), for x86 CPUs
// without AVX-512. Compiled with -mavx2 -mfma -mf16c; only called after a run-time check.
//
// 16 ymm registers: m rows x the columns a pass covers, plus the weights, must fit. gate/up: one
// row takes the whole 64-column k-row a pass, two rows 16 gate + 16 up columns; down: up to two
// rows the whole 32 columns, more rows 16 columns a pass (the int8 and int4 products: 8 + 8 and 16).
#include <immintrin.h>

#include <algorithm>

#include <cstdint>
#include <cstring>

#include "attn_impl.h"
#include "kernels.h"
#include "rope_impl.h"

namespace moe_serve {
namespace {

// gate/up in tiles of at most 2 rows: the two-row kernel (16 + 16 columns a pass) against the
// 8 + 8 column sub-tiles of up to 6 rows it replaced, same process, alternating, best of 3
// (bench.moe_kernels shapes, 2-core AMD EPYC): float32 1.09-1.10x at 8-16 tokens, 0.98-1.07x
// at 32-1,024; bfloat16 1.05-1.23x at 8-16, 0.96-1.01x at 32-1,024.
constexpr int kGateRowsF32 = 2, kDownRowsF32 = 6, kGateRowsBF16 = 2, kDownRowsBF16 = 4, kGateRowsQ8 = 6;
constexpr int kGateRowsQ4 = 6, kDownRowsQ4 = 6;

// exp(x) as in simd_avx512.h, 2^n built in the exponent field (x clamped so that n <= 127).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654475f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 silu_mul256(__m256 g, __m256 u) {
  const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g)));
  return _mm256_div_ps(_mm256_mul_ps(g, u), den);
}

// 8 floats -> 8 bfloat16 (round to nearest even, NaN kept).
inline __m128i to_bf16_256(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

inline __m256 even_f32(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd_f32(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536))); }
inline __m256i pair_at(const bf16_t* p) { return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }
inline __m256i load_si(const bf16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

#define MOE_INLINE inline __attribute__((always_inline))

// Starts the prefetch walk of a kernel's k loop (see Tile::prefetch in kernels.h).
#define MOE_PREFETCH_START                                              \
  const char* pf = reinterpret_cast<const char*>(t.w + t.prefetch);    \
  int countdown = 1;

template <int kBytes>
MOE_INLINE void prefetch_l2(const void* p) {
#pragma GCC unroll 4
  for (int b = 0; b < kBytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T1);
}

// The same bytes of both halves of a block in halves (kernels.h).
template <int kBytes, typename T>
MOE_INLINE void prefetch_halves(const char* p, const Tile<T>& t) {
  prefetch_l2<kBytes>(p);
  prefetch_l2<kBytes>(p + t.half * int64_t(sizeof(T)));
}

template <int M>
MOE_INLINE void init8(__m256 (&v)[M], const float* p, int64_t ld, bool load) {
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) v[r] = load ? _mm256_loadu_ps(p + r * ld) : _mm256_setzero_ps();
}

template <int M>
MOE_INLINE void store8(__m256 (&v)[M], float* p, int64_t ld) {
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) _mm256_storeu_ps(p + r * ld, v[r]);
}

// The epilogue of one 8-column gate/up sub-tile: h (float32 or bfloat16) or the partial sums.
template <int M>
MOE_INLINE void finish8(const Tile<float>& t, __m256 (&g)[M], __m256 (&u)[M], int c) {
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) _mm256_storeu_ps(t.h + r * t.ldh + c, silu_mul256(g[r], u[r]));
}
template <int M>
MOE_INLINE void finish8(const Tile<bf16_t>& t, __m256 (&g)[M], __m256 (&u)[M], int c) {
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(t.h + r * t.ldh + c), to_bf16_256(silu_mul256(g[r], u[r])));
}

template <int M, bool kPrefetch>
void down_f32_m(const Tile<float>& t) {
  for (int c = 0; c < 32; c += 16) {  // 16 columns per pass: one half of the block
    __m256 y0[M], y1[M];
    init8<M>(y0, t.acc + c, t.ldacc, t.load);
    init8<M>(y1, t.acc + c + 8, t.ldacc, t.load);
    MOE_PREFETCH_START
    const float* w = t.w + (c ? t.half : 0);
    for (int kk = 0; kk < t.k; ++kk) {
      const float* wk = w + int64_t(kk) * 16;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_halves<64>(pf, t);
        pf += 64;
      }
      const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256 x = _mm256_broadcast_ss(t.a + r * t.lda + kk);
        y0[r] = _mm256_fmadd_ps(x, w0, y0[r]);
        y1[r] = _mm256_fmadd_ps(x, w1, y1[r]);
      }
    }
    store8<M>(y0, t.acc + c, t.ldacc);
    store8<M>(y1, t.acc + c + 8, t.ldacc);
  }
}

template <int M, bool kPrefetch>
void down_bf16_m(const Tile<bf16_t>& t) {
  const int pairs = (t.k + 1) / 2;
  for (int c = 0; c < 32; c += 16) {
    __m256 y0[M], y1[M];
    init8<M>(y0, t.acc + c, t.ldacc, t.load);
    init8<M>(y1, t.acc + c + 8, t.ldacc, t.load);
    MOE_PREFETCH_START
    const bf16_t* w = t.w + (c ? t.half : 0);  // one half of the block a pass
    for (int p = 0; p < pairs; ++p) {
      const bf16_t* wk = w + int64_t(p) * 32;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_halves<64>(pf, t);
        pf += 64;
      }
      const __m256i v0 = load_si(wk), v1 = load_si(wk + 16);
      const __m256 e0 = even_f32(v0), o0 = odd_f32(v0), e1 = even_f32(v1), o1 = odd_f32(v1);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256i x = pair_at(t.a + r * t.lda + 2 * p);
        const __m256 xe = even_f32(x), xo = odd_f32(x);
        y0[r] = _mm256_fmadd_ps(xo, o0, _mm256_fmadd_ps(xe, e0, y0[r]));
        y1[r] = _mm256_fmadd_ps(xo, o1, _mm256_fmadd_ps(xe, e1, y1[r]));
      }
    }
    store8<M>(y0, t.acc + c, t.ldacc);
    store8<M>(y1, t.acc + c + 8, t.ldacc);
  }
}

// Few rows: the whole k-row per step instead of the sub-tile passes. One row of gate/up (64
// columns: 8 accumulators), one row of down two k-rows a step (two sets of 4 sums), two rows of
// down the 32 columns (4 each), the weights loaded once per k-row and used by every row: the
// block streams in one pass, and 8 independent sums hide the FMA latency that a sub-tile's two
// chains per row expose (decode: one row an expert).

// The accumulators of a one-row gate/up tile (acc[i]: columns 8i..8i+7 of the 64, gate then up):
// from the partial sums or zero, and at the end h (silu(gate) * up) or the partial sums again.
template <typename T>
MOE_INLINE void row_start(const Tile<T>& t, __m256 (&acc)[8]) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = t.load ? _mm256_loadu_ps(t.acc + 8 * i) : _mm256_setzero_ps();
}
template <typename T>
MOE_INLINE void row_end(const Tile<T>& t, __m256 (&acc)[8]) {
  if (t.finish) {
    for (int c = 0; c < 32; c += 8) {
      __m256 g[1] = {acc[c / 8]}, u[1] = {acc[4 + c / 8]};
      finish8<1>(t, g, u, c);
    }
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(t.acc + 8 * i, acc[i]);
  }
}

// The same for a two-row tile's pass over columns c..c+15 of each half: acc[r][i] is gate c,
// gate c + 8, up c, up c + 8 of row r.
MOE_INLINE int two_col(int i, int c) { return (i < 2 ? c : 32 + c) + 8 * (i & 1); }
template <typename T>
MOE_INLINE void two_start(const Tile<T>& t, __m256 (&acc)[2][4], int c) {
#pragma GCC unroll 2
  for (int r = 0; r < 2; ++r)
    for (int i = 0; i < 4; ++i)
      acc[r][i] = t.load ? _mm256_loadu_ps(t.acc + r * 64 + two_col(i, c)) : _mm256_setzero_ps();
}
template <typename T>
MOE_INLINE void two_end(const Tile<T>& t, __m256 (&acc)[2][4], int c) {
  if (t.finish) {
    for (int h = 0; h < 2; ++h) {
      __m256 g[2] = {acc[0][h], acc[1][h]}, u[2] = {acc[0][2 + h], acc[1][2 + h]};
      finish8<2>(t, g, u, c + 8 * h);
    }
  } else {
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(t.acc + r * 64 + two_col(i, c), acc[r][i]);
  }
}

template <bool kPrefetch>
void gate_up_f32_row(const Tile<float>& t) {
  __m256 acc[8];
  row_start(t, acc);
  MOE_PREFETCH_START
  for (int kk = 0; kk < t.k; ++kk) {  // half 0: gate, up 0..15; half 1: 16..31 (two streams)
    const float* wa = t.w + int64_t(kk) * 32;
    const float* wb = wa + t.half;
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_halves<128>(pf, t);
      pf += 128;
    }
    const __m256 x = _mm256_broadcast_ss(t.a + kk);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {  // acc[i]: columns 8i.. of gate 0..31, up 0..31 (row_start)
      const int at = (i & 1) * 8 + (i >> 1) * 16, to = (i & 1) + (i >> 1) * 4;
      acc[to] = _mm256_fmadd_ps(x, _mm256_loadu_ps(wa + at), acc[to]);
      acc[to + 2] = _mm256_fmadd_ps(x, _mm256_loadu_ps(wb + at), acc[to + 2]);
    }
  }
  row_end(t, acc);
}

template <bool kPrefetch>
void gate_up_bf16_row(const Tile<bf16_t>& t) {
  const int pairs = (t.k + 1) / 2;
  __m256 acc[8];
  row_start(t, acc);
  MOE_PREFETCH_START
  for (int p = 0; p < pairs; ++p) {  // half 0: gate, up 0..15; half 1: 16..31 (two streams)
    const bf16_t* wa = t.w + int64_t(p) * 64;
    const bf16_t* wb = wa + t.half;
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_halves<128>(pf, t);
      pf += 128;
    }
    const __m256i x = pair_at(t.a + 2 * p);
    const __m256 xe = even_f32(x), xo = odd_f32(x);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {  // acc[i]: columns 8i.. of gate 0..31, up 0..31 (row_start)
      const int at = (i & 1) * 16 + (i >> 1) * 32, to = (i & 1) + (i >> 1) * 4;
      const __m256i va = load_si(wa + at), vb = load_si(wb + at);
      acc[to] = _mm256_fmadd_ps(xo, odd_f32(va), _mm256_fmadd_ps(xe, even_f32(va), acc[to]));
      acc[to + 2] = _mm256_fmadd_ps(xo, odd_f32(vb), _mm256_fmadd_ps(xe, even_f32(vb), acc[to + 2]));
    }
  }
  row_end(t, acc);
}

// Two rows of gate/up: 16 gate + 16 up columns per pass (two passes, 8 accumulators, the 4 weight
// vectors loaded once for both rows).
template <bool kPrefetch>
void gate_up_f32_two(const Tile<float>& t) {
  for (int c = 0; c < 32; c += 16) {  // pass c: half c / 16, [gate c..c+15 | up c..c+15] a k-row
    __m256 acc[2][4];
    two_start(t, acc, c);
    MOE_PREFETCH_START
    const float* w = t.w + (c ? t.half : 0);
    for (int kk = 0; kk < t.k; ++kk) {
      const float* wk = w + int64_t(kk) * 32;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_halves<128>(pf, t);
        pf += 128;
      }
      const __m256 g0 = _mm256_loadu_ps(wk), g1 = _mm256_loadu_ps(wk + 8), u0 = _mm256_loadu_ps(wk + 16),
                   u1 = _mm256_loadu_ps(wk + 24);
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        const __m256 x = _mm256_broadcast_ss(t.a + r * t.lda + kk);
        acc[r][0] = _mm256_fmadd_ps(x, g0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(x, g1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(x, u0, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(x, u1, acc[r][3]);
      }
    }
    two_end(t, acc, c);
  }
}

template <bool kPrefetch>
void gate_up_bf16_two(const Tile<bf16_t>& t) {
  const int pairs = (t.k + 1) / 2;
  for (int c = 0; c < 32; c += 16) {
    __m256 acc[2][4];
    two_start(t, acc, c);
    MOE_PREFETCH_START
    const bf16_t* w = t.w + (c ? t.half : 0);  // pass c: half c / 16
    for (int p = 0; p < pairs; ++p) {
      const bf16_t* wk = w + int64_t(p) * 64;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_halves<128>(pf, t);
        pf += 128;
      }
      const __m256i x0 = pair_at(t.a + 2 * p), x1 = pair_at(t.a + t.lda + 2 * p);
      const __m256 xe0 = even_f32(x0), xo0 = odd_f32(x0), xe1 = even_f32(x1), xo1 = odd_f32(x1);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {  // gate c, c + 8, up c, c + 8
        const __m256i v = load_si(wk + (i < 2 ? 0 : 32) + 16 * (i & 1));
        const __m256 e = even_f32(v), o = odd_f32(v);
        acc[0][i] = _mm256_fmadd_ps(xo0, o, _mm256_fmadd_ps(xe0, e, acc[0][i]));
        acc[1][i] = _mm256_fmadd_ps(xo1, o, _mm256_fmadd_ps(xe1, e, acc[1][i]));
      }
    }
    two_end(t, acc, c);
  }
}

// One row of down: two k-rows a step into two sets of 4 sums (8 independent chains), added at
// the end.
template <bool kPrefetch>
void down_f32_row(const Tile<float>& t) {
  __m256 y[8];  // y[0..3]: columns 0..31 of k-row kk, y[4..7] of kk + 1 (half 0: 0..15, half 1: 16..31)
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) y[i] = (t.load && i < 4) ? _mm256_loadu_ps(t.acc + 8 * i) : _mm256_setzero_ps();
  MOE_PREFETCH_START
  int kk = 0;
  for (; kk + 1 < t.k; kk += 2) {
    const float* wa = t.w + int64_t(kk) * 16;
    const float* wb = wa + t.half;
    if (kPrefetch && (countdown -= 2) <= 0) {
      countdown += t.prefetch_every;
      prefetch_halves<128>(pf, t);
      pf += 128;
    }
    const __m256 x0 = _mm256_broadcast_ss(t.a + kk), x1 = _mm256_broadcast_ss(t.a + kk + 1);
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
      y[i] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wa + 8 * i), y[i]);
      y[2 + i] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wb + 8 * i), y[2 + i]);
      y[4 + i] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(wa + 16 + 8 * i), y[4 + i]);
      y[6 + i] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(wb + 16 + 8 * i), y[6 + i]);
    }
  }
  if (kk < t.k) {
    const float* wa = t.w + int64_t(kk) * 16;
    const __m256 x0 = _mm256_broadcast_ss(t.a + kk);
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
      y[i] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wa + 8 * i), y[i]);
      y[2 + i] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wa + t.half + 8 * i), y[2 + i]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(t.acc + 8 * i, _mm256_add_ps(y[i], y[4 + i]));
}

template <bool kPrefetch>
void down_bf16_row(const Tile<bf16_t>& t) {
  const int pairs = (t.k + 1) / 2;
  __m256 y[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) y[i] = (t.load && i < 4) ? _mm256_loadu_ps(t.acc + 8 * i) : _mm256_setzero_ps();
  MOE_PREFETCH_START
  int p = 0;
  for (; p + 1 < pairs; p += 2) {  // pairs p, p + 1: columns 0..15 in half 0, 16..31 in half 1
    const bf16_t* wa = t.w + int64_t(p) * 32;
    if (kPrefetch && (countdown -= 2) <= 0) {
      countdown += t.prefetch_every;
      prefetch_halves<128>(pf, t);
      pf += 128;
    }
    const __m256i x0 = pair_at(t.a + 2 * p), x1 = pair_at(t.a + 2 * p + 2);
    const __m256 xe0 = even_f32(x0), xo0 = odd_f32(x0), xe1 = even_f32(x1), xo1 = odd_f32(x1);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const bf16_t* wk = wa + (i < 2 ? 0 : t.half) + 16 * (i & 1);
      const __m256i v0 = load_si(wk), v1 = load_si(wk + 32);
      y[i] = _mm256_fmadd_ps(xo0, odd_f32(v0), _mm256_fmadd_ps(xe0, even_f32(v0), y[i]));
      y[4 + i] = _mm256_fmadd_ps(xo1, odd_f32(v1), _mm256_fmadd_ps(xe1, even_f32(v1), y[4 + i]));
    }
  }
  if (p < pairs) {
    const bf16_t* wa = t.w + int64_t(p) * 32;
    const __m256i x0 = pair_at(t.a + 2 * p);
    const __m256 xe0 = even_f32(x0), xo0 = odd_f32(x0);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256i v0 = load_si(wa + (i < 2 ? 0 : t.half) + 16 * (i & 1));
      y[i] = _mm256_fmadd_ps(xo0, odd_f32(v0), _mm256_fmadd_ps(xe0, even_f32(v0), y[i]));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(t.acc + 8 * i, _mm256_add_ps(y[i], y[4 + i]));
}

template <int M, bool kPrefetch>
void down_f32_rows(const Tile<float>& t) {
  __m256 y[M][4];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < 4; ++i)
      y[r][i] = t.load ? _mm256_loadu_ps(t.acc + r * t.ldacc + 8 * i) : _mm256_setzero_ps();
  MOE_PREFETCH_START
  for (int kk = 0; kk < t.k; ++kk) {
    const float* wk = t.w + int64_t(kk) * 16;  // columns 0..15; 16..31 in the other half
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_halves<64>(pf, t);
      pf += 64;
    }
    const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8), w2 = _mm256_loadu_ps(wk + t.half),
                 w3 = _mm256_loadu_ps(wk + t.half + 8);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m256 x = _mm256_broadcast_ss(t.a + r * t.lda + kk);
      y[r][0] = _mm256_fmadd_ps(x, w0, y[r][0]);
      y[r][1] = _mm256_fmadd_ps(x, w1, y[r][1]);
      y[r][2] = _mm256_fmadd_ps(x, w2, y[r][2]);
      y[r][3] = _mm256_fmadd_ps(x, w3, y[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(t.acc + r * t.ldacc + 8 * i, y[r][i]);
}

template <int M, bool kPrefetch>
void down_bf16_rows(const Tile<bf16_t>& t) {
  const int pairs = (t.k + 1) / 2;
  __m256 y[M][4];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < 4; ++i)
      y[r][i] = t.load ? _mm256_loadu_ps(t.acc + r * t.ldacc + 8 * i) : _mm256_setzero_ps();
  MOE_PREFETCH_START
  for (int p = 0; p < pairs; ++p) {
    const bf16_t* wk = t.w + int64_t(p) * 32;  // columns 0..15; 16..31 in the other half
    if (kPrefetch && --countdown == 0) {
      countdown = t.prefetch_every;
      prefetch_halves<64>(pf, t);
      pf += 64;
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256i v = load_si(wk + (i < 2 ? 0 : t.half) + 16 * (i & 1));
      const __m256 e = even_f32(v), o = odd_f32(v);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256i x = pair_at(t.a + r * t.lda + 2 * p);
        y[r][i] = _mm256_fmadd_ps(odd_f32(x), o, _mm256_fmadd_ps(even_f32(x), e, y[r][i]));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(t.acc + r * t.ldacc + 8 * i, y[r][i]);
}

// int8 weight-only (kernels.h, TileQ8): 8 codes at a time sign-extended to int32 and converted to
// float32 in registers, FMAs over the float32 kernels' sub-tiles (8 gate + 8 up columns, 16 down
// columns: m rows of accumulators and the weights in 16 ymm registers), the column scales applied
// once per sub-tile. The block (K rows of 64 or 32 bytes) stays in L1/L2 across the passes; the
// first pass walks the prefetch, one k-row ahead per k-row.
inline __m256 codes8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 bcast8(const float* p) { return _mm256_broadcast_ss(p); }
inline __m256 bcast8(const bf16_t* p) { return _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(uint32_t(*p) << 16))); }
inline void store_h8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store_h8(bf16_t* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_256(v)); }

template <int M, bool kPrefetch, typename T>
void gate_up_q8_m(const TileQ8<T>& t) {
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int c = 0; c < 32; c += 8) {  // 8 gate + 8 up columns per pass
    __m256 g[M], u[M];
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) g[r] = u[r] = _mm256_setzero_ps();
    for (int kk = 0; kk < t.k; ++kk) {
      const int8_t* wk = t.w + int64_t(kk) * 64 + c;
      if (kPrefetch && c == 0) _mm_prefetch(pf + int64_t(kk) * 64, _MM_HINT_T1);
      const __m256 wg = codes8(wk), wu = codes8(wk + 32);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256 x = bcast8(t.a + r * t.lda + kk);
        g[r] = _mm256_fmadd_ps(x, wg, g[r]);
        u[r] = _mm256_fmadd_ps(x, wu, u[r]);
      }
    }
    const __m256 sg = _mm256_loadu_ps(t.scale + c), su = _mm256_loadu_ps(t.scale + 32 + c);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r)
      store_h8(t.h + r * t.ldh + c, silu_mul256(_mm256_mul_ps(g[r], sg), _mm256_mul_ps(u[r], su)));
  }
}

template <int M, bool kPrefetch, typename T>
void down_q8_m(const TileQ8<T>& t) {
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int c = 0; c < 32; c += 16) {  // 16 columns per pass
    __m256 y0[M], y1[M];
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) y0[r] = y1[r] = _mm256_setzero_ps();
    for (int kk = 0; kk < t.k; ++kk) {
      const int8_t* wk = t.w + int64_t(kk) * 32 + c;
      if (kPrefetch && c == 0 && (kk & 1) == 0) _mm_prefetch(pf + int64_t(kk) * 32, _MM_HINT_T1);
      const __m256 w0 = codes8(wk), w1 = codes8(wk + 8);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256 x = bcast8(t.a + r * t.lda + kk);
        y0[r] = _mm256_fmadd_ps(x, w0, y0[r]);
        y1[r] = _mm256_fmadd_ps(x, w1, y1[r]);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(t.scale + c), s1 = _mm256_loadu_ps(t.scale + c + 8);
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      _mm256_storeu_ps(t.acc + r * t.ldacc + c, _mm256_mul_ps(y0[r], s0));
      _mm256_storeu_ps(t.acc + r * t.ldacc + c + 8, _mm256_mul_ps(y1[r], s1));
    }
  }
}

// One int8 block dequantized with its column scales into the float kernels' layouts (kernels.h):
// this unit's layouts in halves: float32 [2][k][width / 2]; bfloat16 [2][ceil(k/2)][width / 2][2],
// rows kk and kk + 1 of a column side by side.
void dequant_f32(const int8_t* w, int k, int width, const float* scale, float* out) {
  const int hw = width / 2;
  for (int kk = 0; kk < k; ++kk)
    for (int j = 0; j < width; j += 8) {  // 8 columns stay in one half: gated j = 32g + c, plain c
      const int c = j % kBlock, pos = (j / kBlock) * (kBlock / 2) + c % (kBlock / 2);
      _mm256_storeu_ps(out + int64_t(c / (kBlock / 2)) * k * hw + int64_t(kk) * hw + pos,
                       _mm256_mul_ps(codes8(w + int64_t(kk) * width + j), _mm256_loadu_ps(scale + j)));
    }
}

void dequant_bf16(const int8_t* w, int k, int width, const float* scale, bf16_t* out) {
  const int pairs = (k + 1) / 2;
  for (int p = 0; p < pairs; ++p) {
    const int8_t* r0 = w + int64_t(2 * p) * width;
    const bool odd = 2 * p + 1 < k;
    for (int j = 0; j < width; j += 8) {
      const __m256 s = _mm256_loadu_ps(scale + j);
      const __m128i a = to_bf16_256(_mm256_mul_ps(codes8(r0 + j), s));
      const __m128i b = odd ? to_bf16_256(_mm256_mul_ps(codes8(r0 + width + j), s)) : _mm_setzero_si128();
      const int c = j % kBlock, pos = (j / kBlock) * (kBlock / 2) + c % (kBlock / 2);  // in halves
      __m128i* o = reinterpret_cast<__m128i*>(out + ((int64_t(c / (kBlock / 2)) * pairs + p) * (width / 2) + pos) * 2);
      _mm_storeu_si128(o, _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(a, b));
    }
  }
}

// int4 weight-only (kernels.h, TileQ4): a k-row's 16 bytes hold 32 columns (the low nibbles columns
// 0..15, the high ones 16..31), so 8 bytes widened to int32 give 8 columns, masked or shifted. Each
// is converted to float32 and dequantized with its group's scale and bias in one FMA, then the
// int8 products' sub-tiles follow (8 gate + 8 up columns, 16 down columns) on tiles of up to 6 rows
// (12 accumulators; the sub-tile's 4 vectors of scales and biases then partly come from L1: 6-row
// tiles against 4-row ones, bench.int4_kernels shapes, 2-core AMD EPYC, 0.98-1.25x at 32-96 tokens,
// no loss below). The first pass walks the prefetch.
template <bool kHigh>
MOE_INLINE __m256 nibbles8(const uint8_t* p) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtepi32_ps(kHigh ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15)));
}
inline __m256 nibbles8(const uint8_t* p, bool high) { return high ? nibbles8<true>(p) : nibbles8<false>(p); }

template <int M, bool kPrefetch, bool kHigh, typename T>
MOE_INLINE void gate_up_q4_pass(const TileQ4<T>& t, int c) {  // gate and up columns c .. c + 7
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  const int byte = c % 16;
  __m256 g[M], u[M];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) g[r] = u[r] = _mm256_setzero_ps();
  for (int g0 = 0; g0 < t.k; g0 += t.group) {
    const float* sb = t.sb + int64_t(g0 / t.group) * 128;  // 64 scales (gate, up), then 64 biases
    const __m256 sg = _mm256_loadu_ps(sb + c), su = _mm256_loadu_ps(sb + 32 + c);
    const __m256 bg = _mm256_loadu_ps(sb + 64 + c), bu = _mm256_loadu_ps(sb + 96 + c);
    const int end = std::min(g0 + t.group, t.k);
    for (int kk = g0; kk < end; ++kk) {
      const uint8_t* wk = t.w + int64_t(kk) * 32 + byte;
      if (kPrefetch && c == 0 && (kk & 1) == 0) _mm_prefetch(pf + int64_t(kk) * 32, _MM_HINT_T1);
      const __m256 wg = _mm256_fmadd_ps(nibbles8<kHigh>(wk), sg, bg);
      const __m256 wu = _mm256_fmadd_ps(nibbles8<kHigh>(wk + 16), su, bu);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256 x = bcast8(t.a + r * t.lda + kk);
        g[r] = _mm256_fmadd_ps(x, wg, g[r]);
        u[r] = _mm256_fmadd_ps(x, wu, u[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) store_h8(t.h + r * t.ldh + c, silu_mul256(g[r], u[r]));
}

template <int M, bool kPrefetch, typename T>
void gate_up_q4_m(const TileQ4<T>& t) {
  gate_up_q4_pass<M, kPrefetch, false>(t, 0);
  gate_up_q4_pass<M, false, false>(t, 8);
  gate_up_q4_pass<M, false, true>(t, 16);
  gate_up_q4_pass<M, false, true>(t, 24);
}

template <int M, bool kPrefetch, bool kHigh, typename T>
MOE_INLINE void down_q4_pass(const TileQ4<T>& t) {  // columns 0..15 (low nibbles) or 16..31 (high)
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  const int c = kHigh ? 16 : 0;
  __m256 y0[M], y1[M];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) y0[r] = y1[r] = _mm256_setzero_ps();
  for (int g0 = 0; g0 < t.k; g0 += t.group) {
    const float* sb = t.sb + int64_t(g0 / t.group) * 64;  // 32 scales, then 32 biases
    const __m256 s0 = _mm256_loadu_ps(sb + c), s1 = _mm256_loadu_ps(sb + c + 8);
    const __m256 b0 = _mm256_loadu_ps(sb + 32 + c), b1 = _mm256_loadu_ps(sb + 40 + c);
    const int end = std::min(g0 + t.group, t.k);
    for (int kk = g0; kk < end; ++kk) {
      const uint8_t* wk = t.w + int64_t(kk) * 16;
      if (kPrefetch && (kk & 3) == 0) _mm_prefetch(pf + int64_t(kk) * 16, _MM_HINT_T1);
      const __m256 w0 = _mm256_fmadd_ps(nibbles8<kHigh>(wk), s0, b0);
      const __m256 w1 = _mm256_fmadd_ps(nibbles8<kHigh>(wk + 8), s1, b1);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256 x = bcast8(t.a + r * t.lda + kk);
        y0[r] = _mm256_fmadd_ps(x, w0, y0[r]);
        y1[r] = _mm256_fmadd_ps(x, w1, y1[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    _mm256_storeu_ps(t.acc + r * t.ldacc + c, y0[r]);
    _mm256_storeu_ps(t.acc + r * t.ldacc + c + 8, y1[r]);
  }
}

template <int M, bool kPrefetch, typename T>
void down_q4_m(const TileQ4<T>& t) {
  down_q4_pass<M, kPrefetch, false>(t);
  down_q4_pass<M, false, true>(t);
}

// One int4 block dequantized into this unit's float layouts in halves (as dequant_f32 above): the
// 8 columns from j are 8 bytes of the k-row's 32-column group, low nibbles for its columns 0..15.
inline const uint8_t* q4_source(const uint8_t* w, int kk, int width, int j) {
  return w + int64_t(kk) * (width / 2) + (j / kBlock) * (kBlock / 2) + j % (kBlock / 2);
}
inline __m256 q4_column8(const uint8_t* w, int kk, int width, int j, const float* s) {
  return _mm256_fmadd_ps(nibbles8(q4_source(w, kk, width, j), j % kBlock >= kBlock / 2), _mm256_loadu_ps(s + j),
                         _mm256_loadu_ps(s + width + j));
}

void dequant_q4_f32(const uint8_t* w, int k, int width, const float* sb, int group, float* out) {
  const int hw = width / 2;
  for (int kk = 0; kk < k; ++kk) {
    const float* s = sb + int64_t(kk / group) * 2 * width;
    for (int j = 0; j < width; j += 8) {
      const int c = j % kBlock, pos = (j / kBlock) * (kBlock / 2) + c % (kBlock / 2);
      _mm256_storeu_ps(out + int64_t(c / (kBlock / 2)) * k * hw + int64_t(kk) * hw + pos,
                       q4_column8(w, kk, width, j, s));
    }
  }
}

void dequant_q4_bf16(const uint8_t* w, int k, int width, const float* sb, int group, bf16_t* out) {
  const int pairs = (k + 1) / 2;
  for (int p = 0; p < pairs; ++p) {
    const bool odd = 2 * p + 1 < k;
    const float* s0 = sb + int64_t(2 * p / group) * 2 * width;
    const float* s1 = sb + int64_t((2 * p + 1) / group) * 2 * width;
    for (int j = 0; j < width; j += 8) {
      const __m128i a = to_bf16_256(q4_column8(w, 2 * p, width, j, s0));
      const __m128i b = odd ? to_bf16_256(q4_column8(w, 2 * p + 1, width, j, s1)) : _mm_setzero_si128();
      const int c = j % kBlock, pos = (j / kBlock) * (kBlock / 2) + c % (kBlock / 2);  // in halves
      __m128i* o = reinterpret_cast<__m128i*>(out + ((int64_t(c / (kBlock / 2)) * pairs + p) * (width / 2) + pos) * 2);
      _mm_storeu_si128(o, _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(a, b));
    }
  }
}

#define MOE_CASE(fn, n, t) \
  case n:                  \
    return t.prefetch ? fn<n, true>(t) : fn<n, false>(t)
#define MOE_SWITCH_6(fn, t)                                                                  \
  switch (t.m) {                                                                             \
    MOE_CASE(fn, 1, t); MOE_CASE(fn, 2, t); MOE_CASE(fn, 3, t);                              \
    MOE_CASE(fn, 4, t); MOE_CASE(fn, 5, t); MOE_CASE(fn, 6, t);                              \
    default: return;                                                                         \
  }

// (MOE_CASE's fn<n, prefetch>(t) deduces the activation type from the tile)
void gate_up_q8_f32(const TileQ8<float>& t) { MOE_SWITCH_6(gate_up_q8_m, t) }
void gate_up_q8_bf16(const TileQ8<bf16_t>& t) { MOE_SWITCH_6(gate_up_q8_m, t) }
void down_q8_f32(const TileQ8<float>& t) { MOE_SWITCH_6(down_q8_m, t) }
void down_q8_bf16(const TileQ8<bf16_t>& t) { MOE_SWITCH_6(down_q8_m, t) }
void gate_up_q4_f32(const TileQ4<float>& t) { MOE_SWITCH_6(gate_up_q4_m, t) }
void gate_up_q4_bf16(const TileQ4<bf16_t>& t) { MOE_SWITCH_6(gate_up_q4_m, t) }
void down_q4_f32(const TileQ4<float>& t) { MOE_SWITCH_6(down_q4_m, t) }
void down_q4_bf16(const TileQ4<bf16_t>& t) { MOE_SWITCH_6(down_q4_m, t) }

void gate_up_f32(const Tile<float>& t) {
  if (t.m == 1) return t.prefetch ? gate_up_f32_row<true>(t) : gate_up_f32_row<false>(t);
  if (t.m == 2) return t.prefetch ? gate_up_f32_two<true>(t) : gate_up_f32_two<false>(t);
}
void down_f32(const Tile<float>& t) {
  if (t.m == 1) return t.prefetch ? down_f32_row<true>(t) : down_f32_row<false>(t);
  if (t.m == 2) return t.prefetch ? down_f32_rows<2, true>(t) : down_f32_rows<2, false>(t);
  MOE_SWITCH_6(down_f32_m, t)
}
void gate_up_bf16(const Tile<bf16_t>& t) {
  if (t.m == 1) return t.prefetch ? gate_up_bf16_row<true>(t) : gate_up_bf16_row<false>(t);
  if (t.m == 2) return t.prefetch ? gate_up_bf16_two<true>(t) : gate_up_bf16_two<false>(t);
}
void down_bf16(const Tile<bf16_t>& t) {
  if (t.m == 1) return t.prefetch ? down_bf16_row<true>(t) : down_bf16_row<false>(t);
  if (t.m == 2) return t.prefetch ? down_bf16_rows<2, true>(t) : down_bf16_rows<2, false>(t);
  MOE_SWITCH_6(down_bf16_m, t)
}

inline __m256 combine_at(const float* const* ys, const float* wts, int n, int j) {
  __m256 s = _mm256_setzero_ps();
  for (int i = 0; i < n; ++i) {
    const __m256 y = _mm256_loadu_ps(ys[i] + j);
    s = wts ? _mm256_fmadd_ps(_mm256_set1_ps(wts[i]), y, s) : _mm256_add_ps(s, y);
  }
  return s;
}

inline float combine_one(const float* const* ys, const float* wts, int n, int j) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += (wts ? wts[i] : 1.0f) * ys[i][j];
  return s;
}

void combine_f32(float* out, const float* const* ys, const float* wts, int n, int d) {
  int j = 0;
  for (; j + 8 <= d; j += 8) _mm256_storeu_ps(out + j, combine_at(ys, wts, n, j));
  for (; j < d; ++j) out[j] = combine_one(ys, wts, n, j);
}

void combine_bf16(bf16_t* out, const float* const* ys, const float* wts, int n, int d) {
  int j = 0;
  for (; j + 8 <= d; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), to_bf16_256(combine_at(ys, wts, n, j)));
  if (j < d) {  // the tail through one padded vector
    alignas(32) float tmp[8] = {};
    for (int t = j; t < d; ++t) tmp[t - j] = combine_one(ys, wts, n, t);
    alignas(16) bf16_t b[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(b), to_bf16_256(_mm256_load_ps(tmp)));
    std::memcpy(out + j, b, size_t(d - j) * sizeof(bf16_t));
  }
}

// The vector policy of the decode-attention chunk kernel (attn_impl.h): 8 float32 lanes,
// bfloat16 widened on load, tails through a zero-filled copy (float32: vmaskmovps).
struct V256 {
  using vec = __m256;
  static constexpr int W = 8;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec set1(float x) { return _mm256_set1_ps(x); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static vec load(const bf16_t* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static vec load_part(const float* p, int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
  }
  static vec load_part(const bf16_t* p, int n) {
    alignas(16) bf16_t tmp[8] = {};
    std::memcpy(tmp, p, size_t(n) * sizeof(bf16_t));
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(vec v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  static vec exp(vec v) { return exp256(v); }
};

// RoPE rows (rope_impl.h): the attention policy plus bfloat16 stores and tails through a copy.
struct R256 : V256 {
  using V256::store;
  static void store(bf16_t* p, vec v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_256(v)); }
  static void store_part(float* p, vec v, int n) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::memcpy(p, tmp, size_t(n) * sizeof(float));
  }
  static void store_part(bf16_t* p, vec v, int n) {
    alignas(16) bf16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), to_bf16_256(v));
    std::memcpy(p, tmp, size_t(n) * sizeof(bf16_t));
  }
};

void rope_f32(const float* x, int rows, int dh, const float* c, const float* s, float* out) {
  rope_rows<R256>(x, rows, dh, c, s, out);
}
void rope_bf16(const bf16_t* x, int rows, int dh, const bf16_t* c, const bf16_t* s, bf16_t* out) {
  rope_rows<R256>(x, rows, dh, c, s, out);
}

void attn_f32(const AttnChunk<float>& c) { attn_chunk<V256>(c); }
void attn_bf16(const AttnChunk<bf16_t>& c) { attn_chunk<V256>(c); }

// Constant data (designated initializers, no code at load: the build checks).
constexpr Kernels kTable = {.name = "avx2",
                            .gate_rows_f32 = kGateRowsF32,
                            .gate_rows_bf16 = kGateRowsBF16,
                            .down_rows_f32 = kDownRowsF32,
                            .down_rows_bf16 = kDownRowsBF16,
                            .gate_up_f32 = gate_up_f32,
                            .gate_up_bf16 = gate_up_bf16,
                            .down_f32 = down_f32,
                            .down_bf16 = down_bf16,
                            .combine_f32 = combine_f32,
                            .combine_bf16 = combine_bf16,
                            .attn_f32 = attn_f32,
                            .attn_bf16 = attn_bf16,
                            .rope_f32 = rope_f32,
                            .rope_bf16 = rope_bf16,
                            .f32_halves = true,
                            .bf16_halves = true,
                            .gate_rows_q8 = kGateRowsQ8,
                            .down_rows_q8 = kDownRowsF32,
                            .gate_up_q8_f32 = gate_up_q8_f32,
                            .gate_up_q8_bf16 = gate_up_q8_bf16,
                            .down_q8_f32 = down_q8_f32,
                            .down_q8_bf16 = down_q8_bf16,
                            .dequant_f32 = dequant_f32,
                            .dequant_bf16 = dequant_bf16,
                            // the codes in registers win at every measured size in float32 (up to
                            // 256 rows an expert); in bfloat16 up to 16 rows, a tie at 24, the
                            // dequantized blocks from 32 (2-core AMD EPYC, AVX2)
                            .q8_dequant_rows_f32 = 1 << 20,
                            .q8_dequant_rows_bf16 = 20,
                            .gate_rows_q4 = kGateRowsQ4,
                            .down_rows_q4 = kDownRowsQ4,
                            // int4 codes in registers against dequantized blocks (bench.int4_kernels
                            // sweep, 2-core AMD EPYC): float32 activations win to 32 rows an expert
                            // (16.2 vs 17.4 ms at 128 tokens), lose from 48; bfloat16 win at 16 rows,
                            // lose from 24 (14.3 vs 13.3 ms at 96 tokens)
                            .q4_dequant_rows_f32 = 32,
                            .q4_dequant_rows_bf16 = 20,
                            .gate_up_q4_f32 = gate_up_q4_f32,
                            .gate_up_q4_bf16 = gate_up_q4_bf16,
                            .down_q4_f32 = down_q4_f32,
                            .down_q4_bf16 = down_q4_bf16,
                            .dequant_q4_f32 = dequant_q4_f32,
                            .dequant_q4_bf16 = dequant_q4_bf16};

}  // namespace

const Kernels* avx2_kernels() { return &kTable; }

}  // namespace moe_serve
