// AVX2 + FMA micro-kernels (float32, bfloat16 widened to float32 in registers, int8 weight-only
// codes widened the same way), for x86 CPUs
// without AVX-512. Compiled with -mavx2 -mfma -mf16c; only called after a run-time check.
//
// 16 ymm registers: the 32-column packed blocks are walked in sub-tiles (8 gate + 8 up columns for
// w13, 16 columns for w2) so that m rows x sub-tile accumulators plus the weights fit.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attn_impl.h"
#include "kernels.h"
#include "rope_impl.h"

namespace moe_serve {
namespace {

constexpr int kGateRowsF32 = 6, kDownRowsF32 = 6, kGateRowsBF16 = 4, kDownRowsBF16 = 4;

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
void gate_up_f32_m(const Tile<float>& t) {
  for (int c = 0; c < 32; c += 8) {  // 8 gate + 8 up columns per pass
    __m256 g[M], u[M];
    init8<M>(g, t.acc + c, 64, t.load);
    init8<M>(u, t.acc + 32 + c, 64, t.load);
    MOE_PREFETCH_START
    for (int kk = 0; kk < t.k; ++kk) {
      const float* wk = t.w + int64_t(kk) * 64 + c;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_l2<256>(pf);
        pf += 256;
      }
      const __m256 wg = _mm256_loadu_ps(wk), wu = _mm256_loadu_ps(wk + 32);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256 x = _mm256_broadcast_ss(t.a + r * t.lda + kk);
        g[r] = _mm256_fmadd_ps(x, wg, g[r]);
        u[r] = _mm256_fmadd_ps(x, wu, u[r]);
      }
    }
    if (t.finish) {
      finish8<M>(t, g, u, c);
    } else {
      store8<M>(g, t.acc + c, 64);
      store8<M>(u, t.acc + 32 + c, 64);
    }
  }
}

template <int M, bool kPrefetch>
void down_f32_m(const Tile<float>& t) {
  for (int c = 0; c < 32; c += 16) {  // 16 columns per pass
    __m256 y0[M], y1[M];
    init8<M>(y0, t.acc + c, t.ldacc, t.load);
    init8<M>(y1, t.acc + c + 8, t.ldacc, t.load);
    MOE_PREFETCH_START
    for (int kk = 0; kk < t.k; ++kk) {
      const float* wk = t.w + int64_t(kk) * 32 + c;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_l2<128>(pf);
        pf += 128;
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
void gate_up_bf16_m(const Tile<bf16_t>& t) {
  const int pairs = (t.k + 1) / 2;
  for (int c = 0; c < 32; c += 8) {
    __m256 g[M], u[M];
    init8<M>(g, t.acc + c, 64, t.load);
    init8<M>(u, t.acc + 32 + c, 64, t.load);
    MOE_PREFETCH_START
    for (int p = 0; p < pairs; ++p) {
      const bf16_t* wk = t.w + int64_t(p) * 128 + 2 * c;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_l2<256>(pf);
        pf += 256;
      }
      const __m256i vg = load_si(wk), vu = load_si(wk + 64);
      const __m256 ge = even_f32(vg), go = odd_f32(vg), ue = even_f32(vu), uo = odd_f32(vu);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m256i x = pair_at(t.a + r * t.lda + 2 * p);
        const __m256 xe = even_f32(x), xo = odd_f32(x);
        g[r] = _mm256_fmadd_ps(xo, go, _mm256_fmadd_ps(xe, ge, g[r]));
        u[r] = _mm256_fmadd_ps(xo, uo, _mm256_fmadd_ps(xe, ue, u[r]));
      }
    }
    if (t.finish) {
      finish8<M>(t, g, u, c);
    } else {
      store8<M>(g, t.acc + c, 64);
      store8<M>(u, t.acc + 32 + c, 64);
    }
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
    for (int p = 0; p < pairs; ++p) {
      const bf16_t* wk = t.w + int64_t(p) * 64 + 2 * c;
      if (kPrefetch && c == 0 && --countdown == 0) {
        countdown = t.prefetch_every;
        prefetch_l2<128>(pf);
        pf += 128;
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
// float32 [k][width]; bfloat16 [ceil(k/2)][width][2], rows kk and kk + 1 of a column side by side.
void dequant_f32(const int8_t* w, int k, int width, const float* scale, float* out) {
  for (int kk = 0; kk < k; ++kk)
    for (int j = 0; j < width; j += 8)
      _mm256_storeu_ps(out + int64_t(kk) * width + j,
                       _mm256_mul_ps(codes8(w + int64_t(kk) * width + j), _mm256_loadu_ps(scale + j)));
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
      __m128i* o = reinterpret_cast<__m128i*>(out + (int64_t(p) * width + j) * 2);
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

template <int M, bool kPrefetch>
void gate_up_q8_f32_m(const TileQ8<float>& t) { gate_up_q8_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void gate_up_q8_bf16_m(const TileQ8<bf16_t>& t) { gate_up_q8_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void down_q8_f32_m(const TileQ8<float>& t) { down_q8_m<M, kPrefetch>(t); }
template <int M, bool kPrefetch>
void down_q8_bf16_m(const TileQ8<bf16_t>& t) { down_q8_m<M, kPrefetch>(t); }

void gate_up_q8_f32(const TileQ8<float>& t) { MOE_SWITCH_6(gate_up_q8_f32_m, t) }
void gate_up_q8_bf16(const TileQ8<bf16_t>& t) { MOE_SWITCH_6(gate_up_q8_bf16_m, t) }
void down_q8_f32(const TileQ8<float>& t) { MOE_SWITCH_6(down_q8_f32_m, t) }
void down_q8_bf16(const TileQ8<bf16_t>& t) { MOE_SWITCH_6(down_q8_bf16_m, t) }

void gate_up_f32(const Tile<float>& t) { MOE_SWITCH_6(gate_up_f32_m, t) }
void down_f32(const Tile<float>& t) { MOE_SWITCH_6(down_f32_m, t) }
void gate_up_bf16(const Tile<bf16_t>& t) { MOE_SWITCH_6(gate_up_bf16_m, t) }
void down_bf16(const Tile<bf16_t>& t) { MOE_SWITCH_6(down_bf16_m, t) }

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
                            .gate_rows_q8 = kGateRowsF32,
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
                            .q8_dequant_rows_bf16 = 20};

}  // namespace

const Kernels* avx2_kernels() { return &kTable; }

}  // namespace moe_serve
