// AMX-BF16 micro-kernels for the bfloat16 expert products: tdpbf16ps on 16-row tiles.
//
// The packed bfloat16 blocks are already AMX's B layout: every k-pair row of a block holds its
// columns as (k, k+1) pairs, so the 16 columns [16c, 16c + 16) of up to 16 k-pairs are one B tile
// read with the block's row pitch as stride (128 bytes for a plain block, 256 for a gated one).
// A tile: up to 16 activation rows x 32 k columns; C tiles: 16 float32 columns each (4 for
// gate/up: gate 0-15, gate 16-31, up 0-15, up 16-31; 2 for down), loaded from and stored to the
// same float32 partial sums the AVX-512 BF16 kernels keep. Compiled with the AVX-512 BF16 flags
// plus -mamx-tile -mamx-bf16; the rest of the table is the AVX-512 BF16 one (dispatch.cpp).
// Rows below kAmxMinRows go to the AVX-512 BF16 kernels (a tile's fixed cost does not pay for
// them: bench.moe_kernels, README "Native kernels").
#include <immintrin.h>
#include "kernels.h"
#include "simd_avx512.h"

namespace moe_serve {

const int kAmxRows = 16;
const int kAmxMinRows = 4;

namespace {

constexpr int kKChunk = 32;  // k columns per A tile (64 bytes of bfloat16)

// ldtilecfg's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (m x 16 float32); 4: A (m x 32 bf16); 5: B (16 pairs x 16 cols); 6: A for the
// last, shorter k chunk; 7: its B. Loaded on every call: other code on the thread (oneDNN's own
// AMX kernels, under torch) configures the tiles too.
inline void configure(int m, int tail) {
  TileConfig c;
  for (int i = 0; i < 5; ++i) {
    c.rows[i] = uint8_t(m);
    c.colsb[i] = 64;
  }
  c.rows[5] = 16;
  c.colsb[5] = 64;
  const int tk = tail > 0 ? tail : kKChunk;  // an even count of k columns
  c.rows[6] = uint8_t(m);
  c.colsb[6] = uint16_t(tk * 2);
  c.rows[7] = uint8_t(tk / 2);
  c.colsb[7] = 64;
  _tile_loadconfig(&c);
}

// C tiles of the m x (16 * NC) float32 partial sums at acc (row stride ld floats): from acc, or 0.
template <int NC>
inline void c_start(const float* acc, int64_t ld, bool load) {
  if (load) {
    _tile_loadd(0, acc, ld * 4);
    _tile_loadd(1, acc + 16, ld * 4);
    if constexpr (NC == 4) {
      _tile_loadd(2, acc + 32, ld * 4);
      _tile_loadd(3, acc + 48, ld * 4);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (NC == 4) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
}

template <int NC>
inline void c_store(float* acc, int64_t ld) {
  _tile_stored(0, acc, ld * 4);
  _tile_stored(1, acc + 16, ld * 4);
  if constexpr (NC == 4) {
    _tile_stored(2, acc + 32, ld * 4);
    _tile_stored(3, acc + 48, ld * 4);
  }
}

// One k chunk: the A tile TA from ak (stride lda elements) times the NC column tiles of 16 of
// the block rows at wk (pitch = elements per k-pair row), each through the B tile TB. A macro:
// the tile intrinsics paste their tile numbers into the instruction text.
#define MOE_AMX_CHUNK(NC, TA, TB, ak, lda, wk, pitch) \
  do {                                                \
    _tile_loadd(TA, ak, (lda) * 2);                   \
    _tile_loadd(TB, wk, (pitch) * 2);                 \
    _tile_dpbf16ps(0, TA, TB);                        \
    _tile_loadd(TB, (wk) + 32, (pitch) * 2);          \
    _tile_dpbf16ps(1, TA, TB);                        \
    if constexpr ((NC) == 4) {                        \
      _tile_loadd(TB, (wk) + 64, (pitch) * 2);        \
      _tile_dpbf16ps(2, TA, TB);                      \
      _tile_loadd(TB, (wk) + 96, (pitch) * 2);        \
      _tile_dpbf16ps(3, TA, TB);                      \
    }                                                 \
  } while (0)

// The k loop: a (m rows, stride lda elements) times the block at w (pitch = elements per k-pair
// row: 2 * 16 * NC), full chunks on tiles 4/5, the shorter last one on 6/7. With t.prefetch, the
// same walk as the AVX-512 kernels (kernels.h, Tile::prefetch): one k-row of the block pulled
// towards L2 every t.prefetch_every k-rows computed, issued chunk by chunk ahead of its loads.
template <int NC>
inline void k_loop(const Tile<bf16_t>& t, int64_t pitch) {
  const bf16_t *a = t.a, *w = t.w;
  const int64_t lda = t.lda;
  const int k = t.k, full = k / kKChunk;
  const int64_t step = (kKChunk / 2) * pitch;  // block elements per chunk
  const int64_t row_bytes = pitch * 2;
  const char* pf = t.prefetch ? reinterpret_cast<const char*>(t.w + t.prefetch) : nullptr;
  int countdown = 1;
  auto pull = [&](int pairs) {
    for (int p = 0; p < pairs; ++p) {
      if (--countdown) continue;
      countdown = t.prefetch_every;
      for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(pf + b, _MM_HINT_T1);
      pf += row_bytes;
    }
  };
  for (int c = 0; c < full; ++c) {
    if (pf) pull(kKChunk / 2);
    MOE_AMX_CHUNK(NC, 4, 5, a + c * kKChunk, lda, w + c * step, pitch);
  }
  if (full * kKChunk < k) {
    if (pf) pull((k - full * kKChunk + 1) / 2);
    MOE_AMX_CHUNK(NC, 6, 7, a + full * kKChunk, lda, w + full * step, pitch);
  }
}

inline int tail_of(int k) {
  const int rem = k % kKChunk;
  return rem == 0 ? 0 : rem + (rem & 1);  // an odd k reads the zero at column k (kernels.h)
}

}  // namespace

void amx_gate_up(const Tile<bf16_t>& t) {
  if (t.m < kAmxMinRows) return avx512bf16_gate_up(t);
  configure(t.m, tail_of(t.k));
  c_start<4>(t.acc, 64, t.load);
  k_loop<4>(t, 128);
  if (!t.finish) return c_store<4>(t.acc, 64);
  alignas(64) float buf[kAmxRows * 64];
  c_store<4>(buf, 64);
  for (int r = 0; r < t.m; ++r) {
    const float* g = buf + r * 64;
    store_bf16(t.h + r * t.ldh, silu_mul512(_mm512_load_ps(g), _mm512_load_ps(g + 32)));
    store_bf16(t.h + r * t.ldh + 16, silu_mul512(_mm512_load_ps(g + 16), _mm512_load_ps(g + 48)));
  }
}

void amx_down(const Tile<bf16_t>& t) {
  if (t.m < kAmxMinRows) return avx512bf16_down(t);
  configure(t.m, tail_of(t.k));
  c_start<2>(t.acc, t.ldacc, t.load);
  k_loop<2>(t, 64);
  c_store<2>(t.acc, t.ldacc);
}

}  // namespace moe_serve
