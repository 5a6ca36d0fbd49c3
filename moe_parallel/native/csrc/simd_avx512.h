// AVX-512 helpers shared by the AVX-512 units. Everything sits in an anonymous namespace on
// purpose: each unit gets its own copy, compiled with its own flags (see kernels.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace moe_serve {
namespace {

// exp(x): n = round(x log2 e), r = x - n ln 2 in two steps (Cody-Waite), e^r by Cephes' degree-6
// polynomial, scaled by 2^n with vscalefps. About 1 ulp over the clamped range.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654475f)), _mm512_set1_ps(88.37626266f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// silu(g) * u = g * u / (1 + e^-g), with a true division.
inline __m512 silu_mul512(__m512 g, __m512 u) {
  const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)));
  return _mm512_div_ps(_mm512_mul_ps(g, u), den);
}

// 16 floats -> 16 bfloat16, round to nearest even, NaN kept as a quiet NaN (no BF16 instructions).
inline __m256i to_bf16_512(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

#define MOE_INLINE inline __attribute__((always_inline))

// M x NV accumulators: from acc (stride ld floats) when `load`, else zero; and back.
template <int M, int NV>
MOE_INLINE void acc_init(__m512 (&acc)[M][NV], const float* p, int64_t ld, bool load) {
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = load ? _mm512_loadu_ps(p + r * ld + 16 * j) : _mm512_setzero_ps();
}

template <int M, int NV>
MOE_INLINE void acc_store(__m512 (&acc)[M][NV], float* p, int64_t ld) {
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(p + r * ld + 16 * j, acc[r][j]);
}

// Pulls `bytes` of the packed weights at p towards L2, a cache line at a time.
template <int kBytes>
MOE_INLINE void prefetch_l2(const void* p) {
#pragma GCC unroll 4
  for (int b = 0; b < kBytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T1);
}

inline __mmask16 tail_mask(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// out[0:d] = sum_i wts[i] ys[i][0:d] in float32, 16 columns at a time, the tail masked.
inline __m512 combine_at(const float* const* ys, const float* wts, int n, int j, __mmask16 mask) {
  __m512 s = _mm512_setzero_ps();
  for (int i = 0; i < n; ++i) {
    const __m512 y = _mm512_maskz_loadu_ps(mask, ys[i] + j);
    s = wts ? _mm512_fmadd_ps(_mm512_set1_ps(wts[i]), y, s) : _mm512_add_ps(s, y);
  }
  return s;
}

// The vector policy of the decode-attention chunk kernel (attn_impl.h): 16 float32 lanes,
// bfloat16 widened on load, tails masked.
struct V512 {
  using vec = __m512;
  static constexpr int W = 16;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec set1(float x) { return _mm512_set1_ps(x); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static vec load(const uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static vec load_part(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
  static vec load_part(const uint16_t* p, int n) { return widen(_mm256_maskz_loadu_epi16(tail_mask(n), p)); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
  static vec exp(vec v) { return exp512(v); }
};

#if defined(__AVX512BF16__)
// Sixteen float32 lanes rounded to bfloat16 (round to nearest even) into p (the BF16 units).
inline void store_bf16(uint16_t* p, __m512 v) {
  const __m256bh b = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<const __m256i&>(b));
}
#endif

}  // namespace
}  // namespace moe_serve

// Starts the prefetch walk of a kernel's k loop (see Tile::prefetch in kernels.h).
#define MOE_PREFETCH_START                                              \
  const char* pf = reinterpret_cast<const char*>(t.w + t.prefetch);    \
  int countdown = 1;

// Calls fn<m, kPrefetch>(t) for the run-time row count m (1..4, 1..6, 1..8 or 1..12) and prefetch choice.
#define MOE_ROWS_CASE(fn, n, t) \
  case n:                       \
    return t.prefetch ? fn<n, true>(t) : fn<n, false>(t)
#define MOE_ROWS_SWITCH_4(fn, t)                                                      \
  switch (t.m) {                                                                      \
    MOE_ROWS_CASE(fn, 1, t); MOE_ROWS_CASE(fn, 2, t); MOE_ROWS_CASE(fn, 3, t);        \
    MOE_ROWS_CASE(fn, 4, t);                                                          \
    default: return;                                                                  \
  }
#define MOE_ROWS_SWITCH_8(fn, t)                                                      \
  switch (t.m) {                                                                      \
    MOE_ROWS_CASE(fn, 1, t); MOE_ROWS_CASE(fn, 2, t); MOE_ROWS_CASE(fn, 3, t);        \
    MOE_ROWS_CASE(fn, 4, t); MOE_ROWS_CASE(fn, 5, t); MOE_ROWS_CASE(fn, 6, t);        \
    MOE_ROWS_CASE(fn, 7, t); MOE_ROWS_CASE(fn, 8, t);                                 \
    default: return;                                                                  \
  }
#define MOE_ROWS_SWITCH_6(fn, t)                                                      \
  switch (t.m) {                                                                      \
    MOE_ROWS_CASE(fn, 1, t); MOE_ROWS_CASE(fn, 2, t); MOE_ROWS_CASE(fn, 3, t);        \
    MOE_ROWS_CASE(fn, 4, t); MOE_ROWS_CASE(fn, 5, t); MOE_ROWS_CASE(fn, 6, t);        \
    default: return;                                                                  \
  }
#define MOE_ROWS_SWITCH_12(fn, t)                                                     \
  switch (t.m) {                                                                      \
    MOE_ROWS_CASE(fn, 1, t); MOE_ROWS_CASE(fn, 2, t); MOE_ROWS_CASE(fn, 3, t);        \
    MOE_ROWS_CASE(fn, 4, t); MOE_ROWS_CASE(fn, 5, t); MOE_ROWS_CASE(fn, 6, t);        \
    MOE_ROWS_CASE(fn, 7, t); MOE_ROWS_CASE(fn, 8, t); MOE_ROWS_CASE(fn, 9, t);        \
    MOE_ROWS_CASE(fn, 10, t); MOE_ROWS_CASE(fn, 11, t); MOE_ROWS_CASE(fn, 12, t);     \
    default: return;                                                                  \
  }
