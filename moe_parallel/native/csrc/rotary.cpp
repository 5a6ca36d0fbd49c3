// Fused RoPE + KV-cache write (see rotary.h): one token is one work item (its H query heads into
// q_out, its G key heads rotated into the cache row slots[t], its G value heads copied there).
// Small batches run on the calling thread: a parallel region costs more than the whole job until
// a few hundred KB of rows move (bench/rotary.py).
#include "rotary.h"

#include <omp.h>

#include <algorithm>
#include <cstring>

#include "dispatch.h"
#include "kernels.h"

namespace moe_serve {
namespace {

// Elements (q + k + v) one thread should get before another is worth waking.
constexpr int64_t kMinElementsPerThread = 65536;

template <typename T>
void run_typed(const RotaryWriteProblem& p, void (*rope)(const T*, int, int, const T*, const T*, T*)) {
  const int64_t row = (p.h + 2 * p.g) * p.dh, kv = p.g * p.dh;
  const T* qkv = static_cast<const T*>(p.qkv);
  const T* cos = static_cast<const T*>(p.cos);
  const T* sin = static_cast<const T*>(p.sin);
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  T* q_out = static_cast<T*>(p.q_out);
  auto token = [&](int64_t i) {
    const T* x = qkv + i * row;
    const T* c = cos + i * p.dh;
    const T* s = sin + i * p.dh;
    const int64_t at = p.slots[i] * kv;
    rope(x, int(p.h), int(p.dh), c, s, q_out + i * p.h * p.dh);
    rope(x + p.h * p.dh, int(p.g), int(p.dh), c, s, kc + at);
    std::memcpy(vc + at, x + (p.h + p.g) * p.dh, size_t(kv) * sizeof(T));
  };
  const int64_t want = std::max<int64_t>(1, p.t * row / kMinElementsPerThread);
  const int threads = int(std::min<int64_t>({int64_t(p.threads), p.t, want}));
  if (threads <= 1) {
    for (int64_t i = 0; i < p.t; ++i) token(i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < p.t; ++i) token(i);
}

}  // namespace

void run_rotary_cache_write(const RotaryWriteProblem& p) {
  if (p.t == 0) return;
  const Kernels& kern = kernels();
  if (p.bf16) return run_typed<bf16_t>(p, kern.rope_bf16);
  run_typed<float>(p, kern.rope_f32);
}

}  // namespace moe_serve
