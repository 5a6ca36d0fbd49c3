// Decode attention (one query token per sequence) straight from the KV cache through ctx_slots:
// work items are (sequence, KV head, group of <= kAttnRows of its query heads, context chunk).
// Each item's chunk kernel returns an unnormalised partial softmax (max, sum, acc); the items of
// one (sequence, KV head, group) are merged at the end (split-K, flash-decoding style). Contexts
// are split only as far as needed to give every thread a few items, so large batches run one
// item per (sequence, head) and batch 1 still spreads over the cores.
#include "attention.h"
#include "bf16.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "kernels.h"

namespace moe_serve {
namespace {

constexpr int64_t kMinChunk = 128;   // positions: shorter chunks cost more to merge than they save
constexpr int64_t kItemsPerThread = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void store(float* p, float v) { *p = v; }
void store(bf16_t* p, float v) { *p = f32_to_bf16(v); }

struct Item {
  int64_t b, g, row0;  // sequence, KV head, first query row of the group (within the KV head)
  int rows;
  int64_t first, n;  // context positions first .. first + n - 1
  int64_t ws;        // offset of its partial result in the workspace
};

struct Unit {  // one (sequence, KV head, row group): items [item, item + items)
  int64_t item, items;
};

template <typename T>
AttnChunk<T> chunk_of(const DecodeAttnProblem& p, const Item& it, float* ws, int64_t ldacc) {
  const T* q = static_cast<const T*>(p.q) + ((it.b * p.h) + it.g * (p.h / p.g) + it.row0) * p.dh;
  const T* k = static_cast<const T*>(p.k) + it.g * p.dh;
  const T* v = static_cast<const T*>(p.v) + it.g * p.dh;
  float* part = ws + it.ws;
  return {q, it.rows, int(p.dh), p.scale, k, v, p.g * p.dh, p.ctx_slots + it.b * p.l + it.first, int(it.n), part,
          part + 2 * it.rows, ldacc};
}

template <typename T>
void merge(const DecodeAttnProblem& p, const std::vector<Item>& items, const Unit& u, const float* ws,
           int64_t ldacc) {
  const Item& head = items[u.item];
  T* out = static_cast<T*>(p.out) + ((head.b * p.h) + head.g * (p.h / p.g) + head.row0) * p.dh;
  for (int i = 0; i < head.rows; ++i) {
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < u.items; ++c) best = std::max(best, ws[items[u.item + c].ws + 2 * i]);
    float total = 0.0f;
    float row[kAttnMaxDh] = {};
    for (int64_t c = 0; c < u.items; ++c) {
      const Item& it = items[u.item + c];
      const float* ml = ws + it.ws;
      const float wc = std::exp(ml[2 * i] - best);
      total += wc * ml[2 * i + 1];
      const float* acc = ws + it.ws + 2 * it.rows + i * ldacc;
      for (int64_t d = 0; d < p.dh; ++d) row[d] += wc * acc[d];
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < p.dh; ++d) store(out + i * p.dh + d, row[d] * inv);
  }
}

template <typename T>
int64_t run_typed(const DecodeAttnProblem& p, void (*kernel)(const AttnChunk<T>&)) {
  const int64_t per = p.h / p.g, groups = ceil_div(per, kAttnRows), rows = ceil_div(per, groups);
  const int64_t ldacc = ceil_div(p.dh, 16) * 16;
  int64_t work = 0;  // attended positions over every (sequence, KV head, row group)
  for (int64_t b = 0; b < p.b; ++b) {
    const int64_t end = p.q_pos[b] + 1;
    work += p.window > 0 ? std::min(end, p.window) : end;
  }
  work *= p.g * groups;
  const int64_t chunk = std::max(kMinChunk, ceil_div(work, kItemsPerThread * p.threads));
  // Reused between calls of the calling thread; the parallel region reaches them through the
  // references (a thread_local named inside it would be each worker's own, empty, copy).
  thread_local std::vector<Item> items_tls;
  thread_local std::vector<Unit> units_tls;
  thread_local std::vector<float> ws_tls;
  std::vector<Item>& items = items_tls;
  std::vector<Unit>& units = units_tls;
  std::vector<float>& ws = ws_tls;
  items.clear();
  units.clear();
  int64_t ws_floats = 0;
  for (int64_t b = 0; b < p.b; ++b) {
    const int64_t end = p.q_pos[b] + 1, first = p.window > 0 ? std::max<int64_t>(0, end - p.window) : 0;
    const int64_t n = end - first, pieces = ceil_div(n, chunk), len = ceil_div(n, pieces);
    for (int64_t g = 0; g < p.g; ++g)
      for (int64_t row0 = 0; row0 < per; row0 += rows) {
        const int r = int(std::min(rows, per - row0));
        const int64_t start = int64_t(items.size());
        for (int64_t j = first; j < end; j += len) {
          items.push_back({b, g, row0, r, j, std::min(len, end - j), ws_floats});
          ws_floats += r * (2 + ldacc);
        }
        units.push_back({start, int64_t(items.size()) - start});
      }
  }
  if (int64_t(ws.size()) < ws_floats) ws.resize(ws_floats);
  float* const work_space = ws.data();
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const int64_t n_items = int64_t(items.size()), n_units = int64_t(units.size());
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(p.threads, n_items)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) {
      const AttnChunk<T> c = chunk_of<T>(p, items[i], work_space, ldacc);
      int64_t j = 0;
      while (j < c.n && uint64_t(c.slots[j]) < uint64_t(p.s)) ++j;
      if (j < c.n) {
        const int64_t at = c.slots + j - p.ctx_slots;
        for (int64_t seen = bad.load(); at < seen && !bad.compare_exchange_weak(seen, at);) {
        }
        continue;
      }
      kernel(c);
    }
    if (bad.load() == std::numeric_limits<int64_t>::max()) {
#pragma omp for schedule(static)
      for (int64_t u = 0; u < n_units; ++u) merge<T>(p, items, units[u], work_space, ldacc);
    }
  }
  const int64_t first_bad = bad.load();
  return first_bad == std::numeric_limits<int64_t>::max() ? -1 : first_bad;
}

}  // namespace

int64_t run_decode_attention(const DecodeAttnProblem& p) {
  if (p.b == 0 || p.h == 0) return -1;
  const Kernels& kern = kernels();
  if (p.bf16) return run_typed<bf16_t>(p, kern.attn_bf16);
  return run_typed<float>(p, kern.attn_f32);
}

}  // namespace moe_serve
