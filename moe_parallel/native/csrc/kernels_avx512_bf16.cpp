// AVX-512 BF16 micro-kernels: vdpbf16ps on the VNNI-packed weights (each 32-bit lane a (k, k+1)
// pair), float32 accumulators. Compiled with the AVX-512 flags plus -mavx512bf16; the float32
// products and the combine come from the plain AVX-512 unit (dispatch.cpp builds the table).
#include "attn_impl.h"
#include "kernels.h"
#include "simd_avx512.h"

namespace moe_serve {

const int kAvx512Bf16GateRows = 6, kAvx512Bf16DownRows = 12;

namespace {

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }
inline __m512bh pair_at(const bf16_t* p) { return as_bh(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p))); }
inline __m512bh load_bh(const bf16_t* p) { return as_bh(_mm512_loadu_si512(p)); }

template <int M, bool kPrefetch>
void gate_up_m(const Tile<bf16_t>& t) {
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
    const __m512bh w0 = load_bh(wk), w1 = load_bh(wk + 32), w2 = load_bh(wk + 64), w3 = load_bh(wk + 96);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512bh x = pair_at(t.a + r * t.lda + 2 * p);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, w3);
    }
  }
  if (!t.finish) return acc_store<M, 4>(acc, t.acc, 64);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) {
    store_bf16(t.h + r * t.ldh, silu_mul512(acc[r][0], acc[r][2]));
    store_bf16(t.h + r * t.ldh + 16, silu_mul512(acc[r][1], acc[r][3]));
  }
}

template <int M, bool kPrefetch>
void down_m(const Tile<bf16_t>& t) {
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
    const __m512bh w0 = load_bh(wk), w1 = load_bh(wk + 32);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512bh x = pair_at(t.a + r * t.lda + 2 * p);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
    }
  }
  acc_store<M, 2>(acc, t.acc, t.ldacc);
}

// Decode attention's scores with vdpbf16ps on the raw bfloat16 q and K rows (32 products an
// instruction, exact, summed in float32); the rest of the chunk kernel as in the AVX-512 unit.
struct V512Bf16 : V512 {
  static float dot(const float*, const bf16_t* q, const bf16_t* k, int dh) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 64 <= dh; i += 64) {
      s0 = _mm512_dpbf16_ps(s0, load_bh(q + i), load_bh(k + i));
      s1 = _mm512_dpbf16_ps(s1, load_bh(q + i + 32), load_bh(k + i + 32));
    }
    for (; i + 32 <= dh; i += 32) s0 = _mm512_dpbf16_ps(s0, load_bh(q + i), load_bh(k + i));
    if (i < dh) {
      const __mmask32 m = __mmask32((uint64_t(1) << (dh - i)) - 1);
      s1 = _mm512_dpbf16_ps(s1, as_bh(_mm512_maskz_loadu_epi16(m, q + i)), as_bh(_mm512_maskz_loadu_epi16(m, k + i)));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }
};

// int4 weight-only with bfloat16 activations (kernels.h, TileQ4): vdpbf16ps on the codes
// themselves. The nibbles of k-rows kk and kk + 1 of a column go into one 32-bit lane as a pair
// (two widenings, shifts and a masked merge), a 16-entry table (vpermw) turns each code u into
// the bfloat16 u (exact), and one dot product per row takes 32 weights; per group the sums meet
// their scale and bias once: y += scale * sum(x u) + bias * sum(x), the bias being -(8 + zero) *
// scale. Half the instructions per weight of widening to float32 and dequantizing in registers.
// The table is constant data, not a vector built at load time: a unit compiled for AVX-512 runs
// no code before its kernels are chosen (a static initializer here would run its AVX-512
// instructions when the library loads, on every CPU).
alignas(64) constexpr uint16_t kCodeBf16[32] = {  // the bfloat16 bits of float(i % 16)
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
    0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
    0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// The (kk, kk + 1) pairs of the 32 columns whose codes start at r0 and r1 (16 bytes each):
// out[0] columns 0..15, out[1] 16..31, each lane (code of kk, code of kk + 1) as bfloat16.
MOE_INLINE void code_pairs32(const uint8_t* r0, const uint8_t* r1, __m512i lut, __m512i* out) {
  const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1)));
  const __m512i mask = _mm512_set1_epi32(0x000F000F);
  // (A | B) & C: imm 0xA8
  const __m512i lo = _mm512_ternarylogic_epi32(a, _mm512_slli_epi32(b, 16), mask, 0xA8);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi32(a, 4), _mm512_slli_epi32(b, 12), mask, 0xA8);
  out[0] = _mm512_permutexvar_epi16(lo, lut);
  out[1] = _mm512_permutexvar_epi16(hi, lut);
}

// sum of x[0:n] (bfloat16) in float32
MOE_INLINE float sum_bf16(const bf16_t* x, int n) {
  __m512 s = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16)
    s = _mm512_add_ps(s, V512::load(x + i));
  if (i < n) s = _mm512_add_ps(s, V512::load_part(x + i, n - i));
  return _mm512_reduce_add_ps(s);
}

template <int M, bool kPrefetch>
void gate_up_q4_m(const TileQ4<bf16_t>& t) {
  __m512 tot[M][4];
  acc_init<M, 4>(tot, nullptr, 0, false);
  const __m512i lut = _mm512_load_si512(kCodeBf16);
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int g0 = 0; g0 < t.k; g0 += t.group) {
    __m512 acc[M][4];
    acc_init<M, 4>(acc, nullptr, 0, false);
    for (int kk = g0; kk < g0 + t.group; kk += 2) {
      const uint8_t* wk = t.w + int64_t(kk) * 32;
      if (kPrefetch) _mm_prefetch(pf + int64_t(kk) * 32, _MM_HINT_T1);
      __m512i w[4];
      code_pairs32(wk, wk + 32, lut, w);
      code_pairs32(wk + 16, wk + 48, lut, w + 2);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512bh x = pair_at(t.a + r * t.lda + kk);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, as_bh(w[j]));
      }
    }
    const float* sb = t.sb + int64_t(g0 / t.group) * 128;
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 xs = _mm512_set1_ps(sum_bf16(t.a + r * t.lda + g0, t.group));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        tot[r][j] = _mm512_fmadd_ps(acc[r][j], _mm512_loadu_ps(sb + 16 * j),
                                    _mm512_fmadd_ps(xs, _mm512_loadu_ps(sb + 64 + 16 * j), tot[r][j]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    store_bf16(t.h + r * t.ldh, silu_mul512(tot[r][0], tot[r][2]));
    store_bf16(t.h + r * t.ldh + 16, silu_mul512(tot[r][1], tot[r][3]));
  }
}

template <int M, bool kPrefetch>
void down_q4_m(const TileQ4<bf16_t>& t) {
  __m512 tot[M][2];
  acc_init<M, 2>(tot, nullptr, 0, false);
  const __m512i lut = _mm512_load_si512(kCodeBf16);
  const char* pf = reinterpret_cast<const char*>(t.w) + t.prefetch;
  for (int g0 = 0; g0 < t.k; g0 += t.group) {
    __m512 acc[M][2];
    acc_init<M, 2>(acc, nullptr, 0, false);
    for (int kk = g0; kk < g0 + t.group; kk += 2) {
      const uint8_t* wk = t.w + int64_t(kk) * 16;
      if (kPrefetch && (kk & 3) == 0) _mm_prefetch(pf + int64_t(kk) * 16, _MM_HINT_T1);
      __m512i w[2];
      code_pairs32(wk, wk + 16, lut, w);
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) {
        const __m512bh x = pair_at(t.a + r * t.lda + kk);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, as_bh(w[0]));
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, as_bh(w[1]));
      }
    }
    const float* sb = t.sb + int64_t(g0 / t.group) * 64;
    const __m512 s0 = _mm512_loadu_ps(sb), s1 = _mm512_loadu_ps(sb + 16);
    const __m512 b0 = _mm512_loadu_ps(sb + 32), b1 = _mm512_loadu_ps(sb + 48);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) {
      const __m512 xs = _mm512_set1_ps(sum_bf16(t.a + r * t.lda + g0, t.group));
      tot[r][0] = _mm512_fmadd_ps(acc[r][0], s0, _mm512_fmadd_ps(xs, b0, tot[r][0]));
      tot[r][1] = _mm512_fmadd_ps(acc[r][1], s1, _mm512_fmadd_ps(xs, b1, tot[r][1]));
    }
  }
  acc_store<M, 2>(tot, t.acc, t.ldacc);
}

}  // namespace

void avx512bf16_attn(const AttnChunk<bf16_t>& c) { attn_chunk<V512Bf16>(c); }

// An int8 block dequantized into the VNNI bfloat16 layout (kernels.h, DequantBF16) with the BF16
// unit's rounding instruction: per 16 columns, k-rows kk and kk + 1 scaled, interleaved as pairs
// in float32, rounded 16 at a time (the same round-to-nearest-even as the AVX-512 unit's).
void avx512bf16_dequant(const int8_t* w, int k, int width, const float* scale, bf16_t* out) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int kk = 0; kk < k; kk += 2) {
    bf16_t* o = out + int64_t(kk / 2) * width * 2;
    const int8_t* r0 = w + int64_t(kk) * width;
    for (int j = 0; j < width; j += 16) {
      const __m512 s = _mm512_loadu_ps(scale + j);
      const __m512 a = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + j)))), s);
      const __m512 b = kk + 1 < k ? _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + width + j)))), s)
                                  : _mm512_setzero_ps();
      store_bf16(o + 2 * j, _mm512_permutex2var_ps(a, lo, b));
      store_bf16(o + 2 * j + 16, _mm512_permutex2var_ps(a, hi, b));
    }
  }
}

void avx512bf16_gate_up(const Tile<bf16_t>& t) { MOE_ROWS_SWITCH_6(gate_up_m, t) }
void avx512bf16_gate_up_q4(const TileQ4<bf16_t>& t) { MOE_ROWS_SWITCH_4(gate_up_q4_m, t) }
void avx512bf16_down_q4(const TileQ4<bf16_t>& t) { MOE_ROWS_SWITCH_8(down_q4_m, t) }
void avx512bf16_down(const Tile<bf16_t>& t) { MOE_ROWS_SWITCH_12(down_m, t) }

}  // namespace moe_serve
