// The exchange's layer paths (exchange.h): a counting sort and a gather straight into the rings
// on the attention side; reading the rows, the fused rows MoE and the replies on the expert side.
// Every message of a call is published before any reader is woken, so on a host with fewer cores
// than ranks the first woken expert rank does not take the core of the rank still sending.
#include "exchange.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "moe.h"
#include "ring.h"

namespace moe_serve {

using namespace ring;

namespace {

uint64_t readable(const RingCtl& c) {
  return c.head.count.load(std::memory_order_acquire) - c.tail.count.load(std::memory_order_relaxed);
}

uint64_t room(const RingCtl& c, uint64_t cap) {
  return cap - (c.head.count.load(std::memory_order_relaxed) - c.tail.count.load(std::memory_order_acquire));
}

RingCtl& ctl_of(const RingRef& r) { return *static_cast<RingCtl*>(r.ctl); }

// A ring whose producer is more than `cap` bytes ahead of its consumer (or behind it) has a
// corrupted control block: its room and readable counts would wrap, and no copy may trust them.
bool sane(const RingCtl& c, uint64_t cap) {
  return c.head.count.load(std::memory_order_acquire) - c.tail.count.load(std::memory_order_acquire) <= cap;
}

}  // namespace

int shm_dispatch(const DispatchProblem& p) {
  const int64_t n = p.tokens * p.topk, e = p.num_experts, ranks = p.expert_ranks, x = e / ranks;
  thread_local std::vector<int64_t> count, start;
  count.assign(e, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = p.ids[i];
    if (id < 0 || id >= e) return -1;
    ++count[id];
  }
  const uint64_t head_bytes = uint64_t(4 + x) * 8;
  for (int64_t j = 0; j < ranks; ++j) {
    int64_t rows = 0;
    for (int64_t k = 0; k < x; ++k) rows += count[j * x + k];
    p.sizes_out[j] = rows;
    if (!sane(ctl_of(p.rings[j]), p.cap)) return -2;
    if (room(ctl_of(p.rings[j]), p.cap) < head_bytes + uint64_t(rows) * p.row_bytes) return 0;
  }
  start.assign(e + 1, 0);
  for (int64_t k = 0; k < e; ++k) start[k + 1] = start[k] + count[k];
  for (int64_t i = 0; i < n; ++i) {  // stable: a token's rows and an expert's rows keep their order
    const int64_t at = start[p.ids[i]]++;
    p.token_out[at] = i / p.topk;
    p.weight_out[at] = p.weights[i];
  }
  int64_t busy = 0;
  for (int64_t j = 0; j < ranks; ++j) busy += p.sizes_out[j] > 0;
  const int64_t share = p.cores > 0 && busy ? std::max<int64_t>(1, p.cores / busy) : 0;
  const uint8_t* src = static_cast<const uint8_t*>(p.x);
  thread_local std::vector<int64_t> head;
  head.assign(4 + x, 0);
  int64_t at = 0;
  for (int64_t j = 0; j < ranks; ++j) {
    RingCtl& c = ctl_of(p.rings[j]);
    uint64_t h = c.head.count.load(std::memory_order_relaxed);
    head[0] = p.word | (p.sizes_out[j] ? share << 32 : 0);
    head[1] = p.layer, head[2] = p.micro_batch, head[3] = p.sizes_out[j];
    for (int64_t k = 0; k < x; ++k) head[4 + k] = count[j * x + k];
    put(p.rings[j].data, p.cap, h, head.data(), head_bytes);
    h += head_bytes;
    for (int64_t r = 0; r < p.sizes_out[j]; ++r, ++at) {
      put(p.rings[j].data, p.cap, h, src + p.token_out[at] * p.row_bytes, p.row_bytes);
      h += p.row_bytes;
    }
    publish_quiet(c.head, h);
  }
  for (int64_t j = 0; j < ranks; ++j) wake_if_waiting(ctl_of(p.rings[j]).head);
  return 1;
}

int shm_expert_layer(const ExpertLayerProblem& p) {
  const int64_t a = p.attention_ranks, x = p.experts;
  const uint64_t row_bytes = uint64_t(p.d) * (p.bf16 ? 2 : 4);
  int64_t total = 0;
  thread_local std::vector<int64_t> sizes;
  sizes.assign(a, 0);
  const int64_t fit = int64_t(p.cap / row_bytes);  // rows a ring can hold: more go through Python
  for (int64_t r = 0; r < a; ++r) {
    if (!sane(ctl_of(p.in[r]), p.cap) || !sane(ctl_of(p.out[r]), p.cap)) return -2;
    for (int64_t k = 0; k < x; ++k) {
      if (p.counts[r * x + k] < 0) return -1;
      if (p.counts[r * x + k] > fit) return 0;  // bounded before any sum: no overflow
      sizes[r] += p.counts[r * x + k];
    }
    if (sizes[r] > fit) return 0;
    const uint64_t bytes = uint64_t(sizes[r]) * row_bytes;
    if (readable(ctl_of(p.in[r])) < bytes || room(ctl_of(p.out[r]), p.cap) < bytes) return 0;
    total += sizes[r];
  }
  thread_local std::vector<uint8_t> xs, ys;
  thread_local std::vector<int32_t> ids;
  xs.resize(total * row_bytes);
  ys.resize(total * row_bytes);
  ids.resize(total);
  int64_t at = 0;
  for (int64_t r = 0; r < a; ++r) {
    RingCtl& c = ctl_of(p.in[r]);
    const uint64_t t = c.tail.count.load(std::memory_order_relaxed), bytes = uint64_t(sizes[r]) * row_bytes;
    get(p.in[r].data, p.cap, t, xs.data() + at * row_bytes, bytes);
    publish(c.tail, t + bytes);
    for (int64_t k = 0; k < x; ++k)
      for (int64_t i = 0; i < p.counts[r * x + k]; ++i) ids[at++] = int32_t(k);
  }
  if (total) {
    MoeProblem m;
    m.bf16 = p.bf16;
    m.x = xs.data();
    m.tokens = total, m.d = p.d, m.f = p.f;
    m.ids = ids.data(), m.ids64 = false, m.topk = 1;
    m.first_expert = 0, m.num_experts = x;
    m.w13 = p.w13, m.w2 = p.w2, m.out = ys.data(), m.threads = p.threads;
    m.q8 = p.q8, m.q4_group = p.q4_group, m.s13 = p.s13, m.s2 = p.s2;
    run_moe(m);
  }
  at = 0;
  for (int64_t r = 0; r < a; ++r) {
    RingCtl& c = ctl_of(p.out[r]);
    const uint64_t h = c.head.count.load(std::memory_order_relaxed), bytes = uint64_t(sizes[r]) * row_bytes;
    if (!bytes) continue;
    put(p.out[r].data, p.cap, h, ys.data() + at * row_bytes, bytes);
    at += sizes[r];
    publish_quiet(c.head, h + bytes);
  }
  for (int64_t r = 0; r < a; ++r)
    if (sizes[r]) wake_if_waiting(ctl_of(p.out[r]).head);
  return 1;
}

}  // namespace moe_serve
