// Weight packing: [X][N][K] row-major -> 32-column blocks, each block K rows of its columns
// (float32) or ceil(K/2) rows of (k, k+1) pairs per column (bfloat16, the VNNI order the BF16 dot
// product reads). Gated blocks put 32 gate (w1) then 32 up (w3) columns side by side, so one pass
// over x gives both and SiLU(gate) * up happens on the register tile. Runs once, at load.
#include <cstring>

#include "moe.h"

namespace moe_serve {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row of w feeding column j of block b, or -1 for padding.
int64_t source_row(int64_t n, int64_t b, int64_t j, bool gated) {
  if (!gated) {
    const int64_t row = b * kBlock + j;
    return row < n ? row : -1;
  }
  const int64_t f = n / 2, half = j / kBlock, col = b * kBlock + j % kBlock;
  return col < f ? half * f + col : -1;
}

// Element offset within a block (krows k-rows, or k pairs) of column j at k-row kk: one k-row
// (pair) of `width` columns after the other, or in halves (kernels.h) the k-rows of columns
// 16h .. 16h + 15 of each half (gate and up side by side when gated) after those of the half before.
int64_t block_offset(int64_t kk, int64_t j, int64_t krows, int64_t width, int pair, bool gated, bool halves) {
  if (!halves) return (kk / pair) * width * pair + j * pair + kk % pair;
  const int64_t c = gated ? j % kBlock : j, h = c / (kBlock / 2);
  const int64_t pos = (gated ? (j / kBlock) * (kBlock / 2) : 0) + c % (kBlock / 2);
  return (h * krows + kk / pair) * (width / 2) * pair + pos * pair + kk % pair;
}

template <typename T, int kPair>
void pack(const T* w, T* out, int64_t x, int64_t n, int64_t k, bool gated, int threads, bool halves = false) {
  const int64_t width = gated ? 2 * kBlock : kBlock;
  const int64_t blocks = ceil_div(gated ? n / 2 : n, kBlock);
  const int64_t krows = ceil_div(k, kPair);
  const int64_t block_numel = krows * width * kPair;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t xb = 0; xb < x * blocks; ++xb) {
    const int64_t e = xb / blocks, b = xb % blocks;
    T* dst = out + xb * block_numel;
    std::memset(static_cast<void*>(dst), 0, size_t(block_numel) * sizeof(T));
    for (int64_t j = 0; j < width; ++j) {
      const int64_t row = source_row(n, b, j, gated);
      if (row < 0) continue;
      const T* src = w + (e * n + row) * k;
      for (int64_t kk = 0; kk < k; ++kk) dst[block_offset(kk, j, krows, width, kPair, gated, halves)] = src[kk];
    }
  }
}

}  // namespace

int64_t packed_numel(int64_t x, int64_t n, int64_t k, bool gated, bool bf16) {
  const int64_t pair = bf16 ? 2 : 1;
  const int64_t cols = gated ? 2 * kBlock * ceil_div(n / 2, kBlock) : kBlock * ceil_div(n, kBlock);
  return x * cols * ceil_div(k, pair) * pair;
}

void pack_f32(const float* w, float* out, int64_t x, int64_t n, int64_t k, bool gated, int threads, bool halves) {
  pack<float, 1>(w, out, x, n, k, gated, threads, halves);
}

void pack_bf16(const bf16_t* w, bf16_t* out, int64_t x, int64_t n, int64_t k, bool gated, int threads,
               bool halves) {
  pack<bf16_t, 2>(w, out, x, n, k, gated, threads, halves);
}

void pack_i8(const int8_t* w, int8_t* out, int64_t x, int64_t n, int64_t k, bool gated, int threads) {
  pack<int8_t, 1>(w, out, x, n, k, gated, threads);
}

int64_t packed_scale_numel(int64_t x, int64_t n, bool gated) {
  return x * (gated ? 2 * kBlock * ceil_div(n / 2, kBlock) : kBlock * ceil_div(n, kBlock));
}

void pack_scales(const float* s, float* out, int64_t x, int64_t n, bool gated) {
  const int64_t per = packed_scale_numel(1, n, gated), width = gated ? 2 * kBlock : kBlock;
  for (int64_t e = 0; e < x; ++e)
    for (int64_t c = 0; c < per; ++c) {
      const int64_t row = source_row(n, c / width, c % width, gated);
      out[e * per + c] = row < 0 ? 0.0f : s[e * n + row];
    }
}

void pack_i4(const int8_t* w, uint8_t* out, int64_t x, int64_t n, int64_t k, bool gated, int threads) {
  const int64_t width = gated ? 2 * kBlock : kBlock, bytes = width / 2;
  const int64_t blocks = ceil_div(gated ? n / 2 : n, kBlock), block_numel = k * bytes;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t xb = 0; xb < x * blocks; ++xb) {
    const int64_t e = xb / blocks, b = xb % blocks;
    uint8_t* dst = out + xb * block_numel;
    std::memset(dst, 0, size_t(block_numel));
    for (int64_t j = 0; j < width; ++j) {
      const int64_t row = source_row(n, b, j, gated);
      if (row < 0) continue;
      const int8_t* src = w + (e * n + row) * k;
      const int64_t c = j % kBlock, byte = (j / kBlock) * (kBlock / 2) + c % (kBlock / 2);
      const int shift = c < kBlock / 2 ? 0 : 4;
      for (int64_t kk = 0; kk < k; ++kk) dst[kk * bytes + byte] |= uint8_t(((src[kk] + 8) & 15) << shift);
    }
  }
}

void pack_q4_scales(const float* s, const int8_t* z, float* out, int64_t x, int64_t n, int64_t groups, bool gated) {
  const int64_t width = gated ? 2 * kBlock : kBlock, blocks = ceil_div(gated ? n / 2 : n, kBlock);
  for (int64_t e = 0; e < x; ++e)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t g = 0; g < groups; ++g) {
        float* dst = out + ((e * blocks + b) * groups + g) * 2 * width;
        for (int64_t j = 0; j < width; ++j) {
          const int64_t row = source_row(n, b, j, gated);
          const int64_t at = (e * n + row) * groups + g;
          const float scale = row < 0 ? 0.0f : s[at];
          dst[j] = scale;
          dst[width + j] = row < 0 ? 0.0f : -(8.0f + float(z ? z[at] : 0)) * scale;
        }
      }
}

}  // namespace moe_serve
