// The rotate-half RoPE row kernel (RopeF32 / RopeBF16 in kernels.h), written once over a vector
// policy V and instantiated by each ISA unit with its own (see attn_impl.h for the pattern: an
// anonymous namespace, so each unit keeps its own copy compiled with its own flags).
//
// For d < h = dh / 2:  out[d]     = x[d] * cos[d]         - x[d + h] * sin[d]
//                      out[d + h] = x[d + h] * cos[d + h] + x[d] * sin[d + h]
// i.e. x * cos + cat(-x[h:], x[:h]) * sin with the torch path's operation order (two products,
// then one add; a + (-b) == a - b exactly), in float32, no fused multiply-add (rope_opaque), so float32 results
// match torch bit for bit; bfloat16 is widened, computed in float32 and rounded once.
//
// V provides: vec, W, load(const float*), load(const bf16_t*), load_part(p, n) (n < W, rest
// zero), store(T*, vec), store_part(T*, vec, n) (first n lanes), mul, add, sub.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace moe_serve {
namespace {

// Hides a product from the compiler so that it cannot fuse it with the following add or sub into a
// multiply-add (g++ contracts vector intrinsics' a * b + c under its default -ffp-contract=fast,
// which would differ from torch's separately rounded ops by an ulp). Costs nothing at run time.
template <typename vec>
inline vec rope_opaque(vec v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

template <class V, typename T>
void rope_rows(const T* x, int rows, int dh, const T* cos, const T* sin, T* out) {
  using vec = typename V::vec;
  constexpr int W = V::W;
  const int h = dh / 2;
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + int64_t(r) * dh;
    T* o = out + int64_t(r) * dh;
    int d = 0;
    for (; d + W <= h; d += W) {
      const vec lo = V::load(xr + d), hi = V::load(xr + h + d);
      const vec a = rope_opaque(V::mul(lo, V::load(cos + d))), b = rope_opaque(V::mul(hi, V::load(sin + d)));
      const vec c = rope_opaque(V::mul(hi, V::load(cos + h + d))), e = rope_opaque(V::mul(lo, V::load(sin + h + d)));
      V::store(o + d, V::sub(a, b));
      V::store(o + h + d, V::add(c, e));
    }
    if (d < h) {
      const int n = h - d;
      const vec lo = V::load_part(xr + d, n), hi = V::load_part(xr + h + d, n);
      const vec a = rope_opaque(V::mul(lo, V::load_part(cos + d, n)));
      const vec b = rope_opaque(V::mul(hi, V::load_part(sin + d, n)));
      const vec c = rope_opaque(V::mul(hi, V::load_part(cos + h + d, n)));
      const vec e = rope_opaque(V::mul(lo, V::load_part(sin + h + d, n)));
      V::store_part(o + d, V::sub(a, b), n);
      V::store_part(o + h + d, V::add(c, e), n);
    }
  }
}

}  // namespace
}  // namespace moe_serve
