// The decode-attention chunk kernel (AttnChunk in kernels.h), written once over a vector policy
// V and instantiated by each ISA unit with its own (16 floats for AVX-512, 8 for AVX2, 1 for the
// generic unit). Everything sits in an anonymous namespace on purpose: each unit gets its own
// copy, compiled with its own flags (see kernels.h).
//
// V provides: vec, W (lanes), zero(), set1(x), load(const float*), load(const bf16_t*) (W
// elements, bfloat16 widened), load_part(p, n) (the first n < W elements, the rest zero),
// store(float*, v), add, sub, fma(a, b, c) = a * b + c, hsum(v) and exp(v). A policy may also
// provide dot(qf, q, k, dh) (float32 q padded to W, the raw q row, a K row) to replace attn_dot.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels.h"

namespace moe_serve {
namespace {

constexpr int kAttnBlock = 32;  // positions per online-softmax step
#ifndef MOE_ATTN_PREFETCH
#define MOE_ATTN_PREFETCH 1
#endif
constexpr bool kAttnPrefetch = MOE_ATTN_PREFETCH;

inline float attn_to_f32(float v) { return v; }
inline float attn_to_f32(bf16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// (q . k) over dh columns; qf is float32, zero padded to a multiple of W.
template <class V, typename T>
inline float attn_dot(const float* qf, const T* k, int dh) {
  typename V::vec s0 = V::zero(), s1 = V::zero();
  int i = 0;
  for (; i + 2 * V::W <= dh; i += 2 * V::W) {
    s0 = V::fma(V::load(qf + i), V::load(k + i), s0);
    s1 = V::fma(V::load(qf + i + V::W), V::load(k + i + V::W), s1);
  }
  for (; i + V::W <= dh; i += V::W) s0 = V::fma(V::load(qf + i), V::load(k + i), s0);
  if (i < dh) s1 = V::fma(V::load(qf + i), V::load_part(k + i, dh - i), s1);
  return V::hsum(V::add(s0, s1));
}

template <class V, typename T, typename = void>
struct AttnDot {
  static float run(const float* qf, const T*, const T* k, int dh) { return attn_dot<V, T>(qf, k, dh); }
};
template <class V, typename T>
struct AttnDot<V, T, decltype(void(V::dot(static_cast<const float*>(nullptr), static_cast<const T*>(nullptr),
                                          static_cast<const T*>(nullptr), 0)))> {
  static float run(const float* qf, const T* q, const T* k, int dh) { return V::dot(qf, q, k, dh); }
};

template <class V, typename T>
void attn_chunk(const AttnChunk<T>& c) {
  using vec = typename V::vec;
  constexpr int W = V::W, P = kAttnBlock;
  static_assert(P % W == 0, "the score block must hold whole vectors");
  const int r = c.r, dh = c.dh, ld = (dh + W - 1) / W * W;
  alignas(64) float qf[kAttnRows * kAttnMaxDh];
  alignas(64) float s[kAttnRows][P] = {};
  float m[kAttnRows], l[kAttnRows];
  for (int i = 0; i < r; ++i) {
    for (int d = 0; d < ld; ++d) qf[i * ld + d] = d < dh ? attn_to_f32(c.q[i * dh + d]) : 0.0f;
    std::fill(c.acc + i * c.ldacc, c.acc + (i + 1) * c.ldacc, 0.0f);
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.0f;
  }
  const T* kr[P];
  const T* vr[P];
  for (int j0 = 0; j0 < c.n; j0 += P) {
    const int np = std::min(P, c.n - j0);
    for (int j = 0; j < np; ++j) {
      const int64_t at = c.slots[j0 + j] * c.stride;
      kr[j] = c.k + at;
      vr[j] = c.v + at;
    }
    if (kAttnPrefetch) {  // the next block's rows: the slots are scattered, the prefetchers cannot guess them
      const int next = std::min(P, c.n - j0 - P);
      for (int j = 0; j < next; ++j) {
        const char* kp = reinterpret_cast<const char*>(c.k + c.slots[j0 + P + j] * c.stride);
        const char* vp = reinterpret_cast<const char*>(c.v + c.slots[j0 + P + j] * c.stride);
        for (int64_t b = 0; b < int64_t(dh * sizeof(T)); b += 64) {
          __builtin_prefetch(kp + b);
          __builtin_prefetch(vp + b);
        }
      }
    }
    for (int j = 0; j < np; ++j)
      for (int i = 0; i < r; ++i) s[i][j] = AttnDot<V, T>::run(qf + i * ld, c.q + i * dh, kr[j], dh) * c.scale;
    for (int i = 0; i < r; ++i) {
      float* si = s[i];
      float best = si[0];
      for (int j = 1; j < np; ++j) best = std::max(best, si[j]);
      const float mn = std::max(m[i], best);
      const float alpha = std::exp(m[i] - mn);  // 0 on the first block (m = -inf)
      const vec shift = V::set1(mn);
      for (int j = 0; j < np; j += W) V::store(si + j, V::exp(V::sub(V::load(si + j), shift)));
      float sum = 0.0f;
      for (int j = 0; j < np; ++j) sum += si[j];
      m[i] = mn;
      l[i] = l[i] * alpha + sum;
      float* a = c.acc + i * c.ldacc;
      const vec va = V::set1(alpha);
      for (int d = 0; d < ld; d += W) {
        vec acc = V::load(a + d);
        if (j0 > 0) acc = V::mul(acc, va);
        if (d + W <= dh) {
          for (int j = 0; j < np; ++j) acc = V::fma(V::set1(si[j]), V::load(vr[j] + d), acc);
        } else {
          for (int j = 0; j < np; ++j) acc = V::fma(V::set1(si[j]), V::load_part(vr[j] + d, dh - d), acc);
        }
        V::store(a + d, acc);
      }
    }
  }
  for (int i = 0; i < r; ++i) {
    c.ml[2 * i] = m[i];
    c.ml[2 * i + 1] = l[i];
  }
}

}  // namespace
}  // namespace moe_serve
