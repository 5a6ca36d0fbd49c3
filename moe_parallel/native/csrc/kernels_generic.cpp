// Portable scalar micro-kernels (compiled with no -m flags): the fallback for CPUs without AVX2
// and the reference the vector units are tested against. Same contracts as kernels.h.
#include <cmath>
#include <cstring>

#include "attn_impl.h"
#include "bf16.h"
#include "kernels.h"
#include "rope_impl.h"

namespace moe_serve {
namespace {

float silu(float g) { return g / (1.0f + std::exp(-g)); }

float load_f(float v) { return v; }
float load_f(bf16_t v) { return bf16_to_f32(v); }
void store_h(float* p, float v) { *p = v; }
void store_h(bf16_t* p, float v) { *p = f32_to_bf16(v); }

// Packed element (k, j) of a block `width` columns wide: float32 k-rows, bfloat16 k-pairs.
template <typename T>
float packed_at(const T* w, int kk, int j, int width) {
  constexpr int pair = sizeof(T) == 2 ? 2 : 1;
  return load_f(w[int64_t(kk / pair) * width * pair + j * pair + kk % pair]);
}

template <typename T, int kWidth>
void tile_product(const Tile<T>& t, float* acc, int r) {  // acc[0:kWidth] (+)= a[r] . w
  for (int j = 0; j < kWidth; ++j) {
    float s = t.load ? acc[j] : 0.0f;
    for (int kk = 0; kk < t.k; ++kk) s += load_f(t.a[r * t.lda + kk]) * packed_at(t.w, kk, j, kWidth);
    acc[j] = s;
  }
}

template <typename T>
void gate_up(const Tile<T>& t) {
  for (int r = 0; r < t.m; ++r) {
    float* acc = t.acc + r * 2 * kBlock;
    tile_product<T, 2 * kBlock>(t, acc, r);
    if (t.finish)
      for (int j = 0; j < kBlock; ++j) store_h(t.h + r * t.ldh + j, silu(acc[j]) * acc[kBlock + j]);
  }
}

template <typename T>
void down(const Tile<T>& t) {
  for (int r = 0; r < t.m; ++r) tile_product<T, kBlock>(t, t.acc + r * t.ldacc, r);
}

void gate_up_f32(const Tile<float>& t) { gate_up(t); }
void gate_up_bf16(const Tile<bf16_t>& t) { gate_up(t); }
void down_f32(const Tile<float>& t) { down(t); }
void down_bf16(const Tile<bf16_t>& t) { down(t); }

// int8 weight-only products (kernels.h, TileQ8): codes widened to float, scales at the end.
template <typename T>
void gate_up_q8(const TileQ8<T>& t) {
  float acc[2 * kBlock];
  for (int r = 0; r < t.m; ++r) {
    for (int j = 0; j < 2 * kBlock; ++j) {
      float s = 0.0f;
      for (int kk = 0; kk < t.k; ++kk) s += load_f(t.a[r * t.lda + kk]) * float(t.w[int64_t(kk) * 2 * kBlock + j]);
      acc[j] = s * t.scale[j];
    }
    for (int j = 0; j < kBlock; ++j) store_h(t.h + r * t.ldh + j, silu(acc[j]) * acc[kBlock + j]);
  }
}

template <typename T>
void down_q8(const TileQ8<T>& t) {
  for (int r = 0; r < t.m; ++r)
    for (int j = 0; j < kBlock; ++j) {
      float s = 0.0f;
      for (int kk = 0; kk < t.k; ++kk) s += load_f(t.a[r * t.lda + kk]) * float(t.w[int64_t(kk) * kBlock + j]);
      t.acc[r * t.ldacc + j] = s * t.scale[j];
    }
}

void dequant_f32(const int8_t* w, int k, int width, const float* scale, float* out) {
  for (int64_t i = 0; i < int64_t(k) * width; ++i) out[i] = float(w[i]) * scale[i % width];
}

void dequant_bf16(const int8_t* w, int k, int width, const float* scale, bf16_t* out) {
  const int pairs = (k + 1) / 2;
  for (int p = 0; p < pairs; ++p)
    for (int j = 0; j < width; ++j)
      for (int h = 0; h < 2; ++h) {
        const int kk = 2 * p + h;
        out[(int64_t(p) * width + j) * 2 + h] = kk < k ? f32_to_bf16(float(w[int64_t(kk) * width + j]) * scale[j]) : 0;
      }
}

void gate_up_q8_f32(const TileQ8<float>& t) { gate_up_q8(t); }
void gate_up_q8_bf16(const TileQ8<bf16_t>& t) { gate_up_q8(t); }
void down_q8_f32(const TileQ8<float>& t) { down_q8(t); }
void down_q8_bf16(const TileQ8<bf16_t>& t) { down_q8(t); }

void combine_f32(float* out, const float* const* ys, const float* wts, int n, int d) {
  for (int j = 0; j < d; ++j) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += (wts ? wts[i] : 1.0f) * ys[i][j];
    out[j] = s;
  }
}

void combine_bf16(bf16_t* out, const float* const* ys, const float* wts, int n, int d) {
  for (int j = 0; j < d; ++j) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += (wts ? wts[i] : 1.0f) * ys[i][j];
    out[j] = f32_to_bf16(s);
  }
}

// One float per "vector": the attention chunk kernel of attn_impl.h in plain scalar code.
struct Scalar {
  using vec = float;
  static constexpr int W = 1;
  static float zero() { return 0.0f; }
  static float set1(float x) { return x; }
  static float load(const float* p) { return *p; }
  static float load(const bf16_t* p) { return bf16_to_f32(*p); }
  static float load_part(const float*, int) { return 0.0f; }  // never called: W = 1
  static float load_part(const bf16_t*, int) { return 0.0f; }
  static void store(float* p, float v) { *p = v; }
  static float add(float a, float b) { return a + b; }
  static float sub(float a, float b) { return a - b; }
  static float mul(float a, float b) { return a * b; }
  static float fma(float a, float b, float c) { return a * b + c; }
  static float hsum(float v) { return v; }
  static float exp(float v) { return std::exp(v); }
};

// RoPE rows (rope_impl.h): the scalar policy plus stores; W = 1 has no tails.
struct ScalarRope : Scalar {
  using Scalar::store;
  static void store(bf16_t* p, float v) { *p = f32_to_bf16(v); }
  static void store_part(float*, float, int) {}  // never called: W = 1
  static void store_part(bf16_t*, float, int) {}
};

void rope_f32(const float* x, int rows, int dh, const float* c, const float* s, float* out) {
  rope_rows<ScalarRope>(x, rows, dh, c, s, out);
}
void rope_bf16(const bf16_t* x, int rows, int dh, const bf16_t* c, const bf16_t* s, bf16_t* out) {
  rope_rows<ScalarRope>(x, rows, dh, c, s, out);
}

void attn_f32(const AttnChunk<float>& c) { attn_chunk<Scalar>(c); }
void attn_bf16(const AttnChunk<bf16_t>& c) { attn_chunk<Scalar>(c); }

const Kernels kTable = [] {
  Kernels t = {"generic", 8,         8,           8,           8,        gate_up_f32, gate_up_bf16, down_f32,
               down_bf16, combine_f32, combine_bf16, attn_f32, attn_bf16, rope_f32,    rope_bf16};
  t.gate_rows_q8 = t.down_rows_q8 = 8;
  t.gate_up_q8_f32 = gate_up_q8_f32;
  t.gate_up_q8_bf16 = gate_up_q8_bf16;
  t.down_q8_f32 = down_q8_f32;
  t.down_q8_bf16 = down_q8_bf16;
  t.dequant_f32 = dequant_f32;
  t.dequant_bf16 = dequant_bf16;
  return t;
}();

}  // namespace

const Kernels* generic_kernels() { return &kTable; }

}  // namespace moe_serve
