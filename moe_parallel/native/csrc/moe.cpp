// The fused MoE layer on the CPU, one OpenMP region per call:
//
//   1. counting sort of the (token, k) pairs by local expert (ids outside the range skipped)
//   2. gather: x rows copied in expert order into xs [rows][dx] (zero padded)
//   3. gate/up: tasks (expert, row block, 32-column block of F) pulled from an atomic counter;
//      each computes h = silu(xs w1^T) * (xs w3^T) for its rows and columns into h [rows][fp]
//   4. barrier, then down: tasks (expert, row block, 32-column block of D): y = h w2^T [rows][dy]
//   5. barrier, then per token: out[t] = sum_k weight[t, k] * y[pos(t, k)], float32, one rounding
//
// Every packed weight block is read once per row block: in decode (rows per expert below the row
// block) each weight byte leaves memory once and serves every row routed to its expert.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "dispatch.h"
#include "moe.h"

namespace moe_serve {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct Task {
  int32_t expert, row0, rows, block, blocks;  // blocks [block, block + blocks) of the expert
};

struct Routing {
  std::vector<int32_t> count, start;  // per expert: rows, first sorted row
  std::vector<int32_t> src;           // sorted row -> token
  std::vector<int32_t> pos;           // (token, k) -> sorted row, -1 if skipped
  int64_t skipped = 0;
};

template <typename Id>
void sort_pairs(const MoeProblem& p, const Id* ids, Routing& r) {
  const int64_t pairs = p.tokens * p.topk, x = p.num_experts;
  r.count.assign(x, 0);
  r.start.assign(x + 1, 0);
  r.pos.resize(pairs);
  r.skipped = 0;
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t e = int64_t(ids[i]) - p.first_expert;
    if (e >= 0 && e < x) ++r.count[e]; else ++r.skipped;
  }
  for (int64_t e = 0; e < x; ++e) r.start[e + 1] = r.start[e] + r.count[e];
  r.src.resize(r.start[x]);
  std::vector<int32_t> next(r.start.begin(), r.start.end() - 1);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t e = int64_t(ids[i]) - p.first_expert;
    if (e < 0 || e >= x) { r.pos[i] = -1; continue; }
    r.pos[i] = next[e]++;
    r.src[r.pos[i]] = int32_t(i / p.topk);
  }
}

// (expert, row block, run of up to `per_task` column blocks) for every expert with rows; row
// blocks of near-equal size. Consecutive blocks of an expert are adjacent in memory, so a task is
// one stream; runs are shortened until there are at least `min_tasks` tasks to share out.
std::vector<Task> make_tasks(const Routing& r, int64_t blocks, int64_t row_block, int64_t per_task,
                             int64_t min_tasks) {
  int64_t units = 0;  // (row block, column block) pairs
  for (const int32_t n : r.count) units += ceil_div(n, row_block) * blocks;
  per_task = std::max<int64_t>(1, std::min(per_task, units / std::max<int64_t>(1, min_tasks)));
  std::vector<Task> tasks;
  for (size_t e = 0; e < r.count.size(); ++e) {
    const int64_t n = r.count[e];
    if (n == 0) continue;
    const int64_t parts = ceil_div(n, row_block);
    for (int64_t q = 0; q < parts; ++q) {
      const int64_t lo = n * q / parts, hi = n * (q + 1) / parts;
      for (int64_t b = 0; b < blocks; b += per_task)
        tasks.push_back({int32_t(e), int32_t(r.start[e] + lo), int32_t(hi - lo), int32_t(b),
                         int32_t(std::min(per_task, blocks - b))});
    }
  }
  return tasks;
}

template <typename T>
struct Ops;  // the kernel table entries of one dtype
template <>
struct Ops<float> {
  static int gate_rows(const Kernels& k) { return k.gate_rows_f32; }
  static int down_rows(const Kernels& k) { return k.down_rows_f32; }
  static GateUpF32 gate_up(const Kernels& k) { return k.gate_up_f32; }
  static DownF32 down(const Kernels& k) { return k.down_f32; }
  static CombineF32 combine(const Kernels& k) { return k.combine_f32; }
  static bool slices(const Kernels&) { return true; }
  static constexpr int64_t pair = 1;
};
template <>
struct Ops<bf16_t> {
  static int gate_rows(const Kernels& k) { return k.gate_rows_bf16; }
  static int down_rows(const Kernels& k) { return k.down_rows_bf16; }
  static GateUpBF16 gate_up(const Kernels& k) { return k.gate_up_bf16; }
  static DownBF16 down(const Kernels& k) { return k.down_bf16; }
  static CombineBF16 combine(const Kernels& k) { return k.combine_bf16; }
  static bool slices(const Kernels& k) { return k.slice_bf16; }
  static constexpr int64_t pair = 2;
};

// One task's rows times one packed block (`width` columns per k-row), in row chunks of at most
// `tile` rows. With one chunk the block streams through once (prefetched `stream_prefetch` bytes
// ahead when set). With a few, K is cut into slices of `k_slice` columns and every chunk runs a
// slice before the next starts, partial sums kept in acc: the block then leaves memory once, in
// order, and with `prefetch` each chunk pulls its share of the next slice towards L2 while it
// computes, so the memory stream keeps going under the arithmetic.
template <typename T, typename Kernel>
void block_product(Kernel kernel, const Tile<T>& base, int rows, int tile, int64_t width, const Tuning& tune) {
  constexpr int pair = Ops<T>::pair;
  const int parts = int(ceil_div(rows, tile)), k = base.k;
  if (base.half) width /= 2;  // halves (kernels.h): a slice starts at the same k-row of both
  if (parts == 1) {
    Tile<T> t = base;
    t.prefetch = tune.stream_prefetch / int64_t(sizeof(T));
    t.prefetch_every = 1;
    return kernel(t);
  }
  const bool prefetch = tune.prefetch;
  int slice = parts <= tune.slice_max_tiles ? tune.k_slice : 0;
  if (slice <= 0 || slice >= k) slice = k;
  slice = int(round_up(slice, pair));
  for (int ks = 0; ks < k; ks += slice) {
    const int kl = std::min(slice, k - ks), next = std::min(slice, k - ks - kl);
    const int next_rows = int(ceil_div(next, pair)), iters = int(ceil_div(kl, pair));
    for (int q = 0; q < parts; ++q) {
      const int lo = rows * q / parts, hi = rows * (q + 1) / parts;
      const int first = next_rows * q / parts, count = next_rows * (q + 1) / parts - first;
      Tile<T> t = base;
      t.a = base.a + lo * base.lda + ks;
      t.m = hi - lo;
      t.k = kl;
      t.w = base.w + ks * width;
      t.acc = base.acc + lo * base.ldacc;
      t.load = ks > 0;
      t.finish = ks + kl == k;
      t.h = base.h ? base.h + lo * base.ldh : nullptr;
      t.prefetch = prefetch && count > 0 ? kl * width + first * width * pair : 0;
      t.prefetch_every = count > 0 ? std::max(1, iters / count) : 1;
      kernel(t);
    }
  }
}

// The Tile::half of a packed block of k rows and `width` columns when the running kernels take
// its dtype in halves (kernels.h), else 0.
template <typename T>
int64_t half_of(int64_t k, int64_t width) {
  if (std::is_same<T, float>::value) return kernels().f32_halves ? k * width / 2 : 0;
  return kernels().bf16_halves ? round_up(k, 2) * width / 2 : 0;
}

// Per calling thread: grows to the largest call and stays, so the hot path takes no page faults;
// given back when a call needs under 1/8 of a holding above 256 MiB (after a long prefill).
struct Scratch {
  void* data = nullptr;
  size_t size = 0;
  void* get(size_t bytes) {
    if (bytes > size || (size > (size_t(256) << 20) && bytes < size / 8)) {
      std::free(data);
      size = round_up(int64_t(std::max(bytes, bytes > size ? size * 3 / 2 : bytes)), 4096);
      data = std::aligned_alloc(64, size);
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};

int tile_rows(int tuned, int kernel_max) { return tuned > 0 ? std::min(tuned, kernel_max) : kernel_max; }

// One call's sizes, weights and scratch buffers. Row strides: dx (x rows, zero padded past d), fp
// (h, F rounded to the block), dy (y, D rounded to the block); per-thread gate/up partial sums.
template <typename T>
struct Layer {
  int64_t d, f, rows, dx, fp, dy, fb, db, w13_block, w2_block, acc_floats;
  const T *x, *w13, *w2;
  T *xs, *h, *out;
  float *y, *accs;

  Layer(const MoeProblem& p, int64_t routed, int row_block, Scratch& scratch)
      : d(p.d), f(p.f), rows(routed), dx(round_up(d + 1, 16)), fp(round_up(f, kBlock)), dy(round_up(d, kBlock)),
        fb(ceil_div(f, kBlock)), db(ceil_div(d, kBlock)),
        w13_block(round_up(d, Ops<T>::pair) * 2 * kBlock), w2_block(round_up(f, Ops<T>::pair) * kBlock),
        acc_floats(round_up(int64_t(row_block) * 2 * kBlock, 16)), x(static_cast<const T*>(p.x)),
        w13(static_cast<const T*>(p.w13)), w2(static_cast<const T*>(p.w2)), out(static_cast<T*>(p.out)) {
    const int64_t xs_bytes = round_up(rows * dx * int64_t(sizeof(T)), 64);
    const int64_t h_bytes = round_up(rows * fp * int64_t(sizeof(T)), 64), y_bytes = round_up(rows * dy * 4, 64);
    char* base = static_cast<char*>(scratch.get(size_t(xs_bytes + h_bytes + y_bytes + p.threads * acc_floats * 4)));
    xs = reinterpret_cast<T*>(base);
    h = reinterpret_cast<T*>(base + xs_bytes);
    y = reinterpret_cast<float*>(base + xs_bytes + h_bytes);
    accs = reinterpret_cast<float*>(base + xs_bytes + h_bytes + y_bytes);
  }

  void gather(const Routing& r, int64_t i) const {
    std::memcpy(xs + i * dx, x + r.src[i] * d, d * sizeof(T));
    std::memset(static_cast<void*>(xs + i * dx + d), 0, (dx - d) * sizeof(T));
  }

  Tile<T> gate_tile(const Task& t, int64_t b, float* acc) const {
    return {xs + t.row0 * dx, dx, t.rows, int(d), w13 + (t.expert * fb + b) * w13_block, 0, 1,
            acc, 2 * kBlock, false, true, h + t.row0 * fp + b * kBlock, fp, half_of<T>(d, 2 * kBlock)};
  }

  Tile<T> down_tile(const Task& t, int64_t b) const {
    return {h + t.row0 * fp, fp, t.rows, int(f), w2 + (t.expert * db + b) * w2_block, 0, 1,
            y + t.row0 * dy + b * kBlock, dy, false, true, nullptr, 0, half_of<T>(f, kBlock)};
  }
};

// Pulls tasks from `next` until none are left, running each through fn.
template <typename Fn>
void drain(std::atomic<int64_t>& next, const std::vector<Task>& tasks, Fn fn) {
  for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < int64_t(tasks.size());) fn(tasks[i]);
}

// The float products of one dtype as the running ISA and the tuning give them (run_typed, and
// run_quant's tasks that dequantize their block).
template <typename T>
struct FloatProducts {
  using Product = void (*)(const Tile<T>&);
  Tuning tune;
  int gate_rows, down_rows;
  Product gate_up, down;

  FloatProducts(const Kernels& k, Tuning t)
      : tune(t), gate_rows(tile_rows(t.gate_rows, Ops<T>::gate_rows(k))),
        down_rows(tile_rows(t.down_rows, Ops<T>::down_rows(k))), gate_up(Ops<T>::gate_up(k)), down(Ops<T>::down(k)) {
    if (!Ops<T>::slices(k)) tune.k_slice = 0;
  }
  void gate(const Tile<T>& tile, int rows) const { block_product(gate_up, tile, rows, gate_rows, 2 * kBlock, tune); }
  void project(const Tile<T>& tile, int rows) const { block_product(down, tile, rows, down_rows, kBlock, tune); }
};

// One call's layer around its products, one OpenMP region: gather, the gate/up tasks, barrier,
// the down tasks, barrier, the weighted top-k sum per token. gate(L, task, acc) and down(L, task)
// run one task (acc: this thread's gate/up partial sums).
template <typename T, typename Gate, typename Down>
void run_layer(const MoeProblem& p, const Routing& r, const Tuning& tune, Gate gate, Down down) {
  const int row_block = std::max(1, tune.row_block);
  thread_local Scratch scratch;
  const Layer<T> L(p, r.start.back(), row_block, scratch);
  const int per_task = std::max(1, tune.blocks_per_task);
  const std::vector<Task> gate_tasks = make_tasks(r, L.fb, row_block, per_task, 4 * p.threads);
  const std::vector<Task> down_tasks = make_tasks(r, L.db, row_block, per_task, 4 * p.threads);
  const auto combine = Ops<T>::combine(kernels());
  std::atomic<int64_t> next_gate{0}, next_down{0};

#pragma omp parallel num_threads(p.threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < L.rows; ++i) L.gather(r, i);
    float* acc = L.accs + omp_get_thread_num() * L.acc_floats;
    drain(next_gate, gate_tasks, [&](const Task& t) { gate(L, t, acc); });
#pragma omp barrier
    drain(next_down, down_tasks, [&](const Task& t) { down(L, t); });
#pragma omp barrier
    std::vector<const float*> ys(p.topk);
    std::vector<float> wts(p.topk);
#pragma omp for schedule(static)
    for (int64_t tok = 0; tok < p.tokens; ++tok) {
      int n = 0;
      for (int64_t k = 0; k < p.topk; ++k) {
        const int32_t at = r.pos[tok * p.topk + k];
        if (at < 0) continue;
        ys[n] = L.y + at * L.dy;
        wts[n++] = p.weights ? p.weights[tok * p.topk + k] : 1.0f;
      }
      combine(L.out + tok * L.d, ys.data(), p.weights ? wts.data() : nullptr, n, int(L.d));
    }
  }
}

template <typename T>
void run_typed(const MoeProblem& p, const Routing& r) {
  const FloatProducts<T> fp(kernels(), get_tuning());
  run_layer<T>(
      p, r, fp.tune,
      [&](const Layer<T>& L, const Task& t, float* acc) {
        for (int b = t.block; b < t.block + t.blocks; ++b) fp.gate(L.gate_tile(t, b, acc), t.rows);
      },
      [&](const Layer<T>& L, const Task& t) {
        for (int b = t.block; b < t.block + t.blocks; ++b) fp.project(L.down_tile(t, b), t.rows);
      });
}

// The weight-only layers: the same sort, gather, tasks and combine as float experts, the products
// on int8 (TileQ8) or int4 (TileQ4) blocks over the whole K. A task's rows go through in chunks of
// the register tile; the first chunk streams the block from memory (prefetched `stream_prefetch`
// bytes ahead), the others find it in L2. Tasks with more rows than the codes' `dequant_rows`
// dequantize their block once (into the activation dtype's layout, L2-resident, a per-thread
// buffer) and run the float kernels of the running ISA on it, as float experts do
// (bench.int8_kernels, bench.int4_kernels: the thresholds from sweeps there).
template <typename Tile, typename Kernel>
void quant_product(Kernel kernel, Tile t, int rows, int tile, int64_t stream_prefetch) {
  for (int lo = 0; lo < rows; lo += tile) {
    Tile c = t;
    c.a = t.a + lo * t.lda;
    c.m = std::min(tile, rows - lo);
    c.acc = t.acc ? t.acc + lo * t.ldacc : nullptr;
    c.h = t.h ? t.h + lo * t.ldh : nullptr;
    c.prefetch = lo == 0 ? stream_prefetch : 0;
    kernel(c);
  }
}

// int8 codes (MoeProblem::q8), one scale per output column; ISAs without int8 products of their
// own use the generic ones.
template <typename T>
struct Q8Codes;
template <>
struct Q8Codes<float> {
  static GateUpQ8F32 gate_up(const Kernels& k) { return k.gate_up_q8_f32; }
  static DownQ8F32 down(const Kernels& k) { return k.down_q8_f32; }
  static DequantF32 dequant(const Kernels& k) { return k.dequant_f32; }
  static int dequant_rows(const Kernels& k) { return k.q8_dequant_rows_f32; }
};
template <>
struct Q8Codes<bf16_t> {
  static GateUpQ8BF16 gate_up(const Kernels& k) { return k.gate_up_q8_bf16; }
  static DownQ8BF16 down(const Kernels& k) { return k.down_q8_bf16; }
  static DequantBF16 dequant(const Kernels& k) { return k.dequant_bf16; }
  static int dequant_rows(const Kernels& k) { return k.q8_dequant_rows_bf16; }
};

template <typename T>
struct Q8Layer {
  using Tile = TileQ8<T>;
  const Kernels& kern;
  int gate_rows, down_rows, dequant_rows;
  decltype(Q8Codes<T>::gate_up(kern)) gate_up;
  decltype(Q8Codes<T>::down(kern)) down;
  decltype(Q8Codes<T>::dequant(kern)) dequant_fn;
  const MoeProblem& p;

  Q8Layer(const MoeProblem& pr, const Tuning& tune)
      : kern(kernels().gate_up_q8_f32 ? kernels() : *generic_kernels()),
        gate_rows(tile_rows(tune.gate_rows, kern.gate_rows_q8)), down_rows(tile_rows(tune.down_rows, kern.down_rows_q8)),
        dequant_rows(tune.q8_dequant_rows >= 0 ? tune.q8_dequant_rows : Q8Codes<T>::dequant_rows(kern)),
        gate_up(Q8Codes<T>::gate_up(kern)), down(Q8Codes<T>::down(kern)), dequant_fn(Q8Codes<T>::dequant(kern)),
        p(pr) {}

  Tile gate_tile(int64_t blk, const T* a, int64_t lda, int m, T* h, int64_t ldh) const {
    return {a, lda, m, int(p.d), static_cast<const int8_t*>(p.w13) + blk * p.d * 2 * kBlock, p.s13 + blk * 2 * kBlock,
            0, nullptr, 0, h, ldh};
  }
  Tile down_tile(int64_t blk, const T* a, int64_t lda, int m, float* y, int64_t ldy) const {
    return {a, lda, m, int(p.f), static_cast<const int8_t*>(p.w2) + blk * p.f * kBlock, p.s2 + blk * kBlock, 0, y, ldy,
            nullptr, 0};
  }
  void dequant(const Tile& t, int width, T* out) const { dequant_fn(t.w, t.k, width, t.scale, out); }
};

// int4 codes (MoeProblem::q4_group), a scale and bias per (group, column); only ISAs with int4
// products of their own get here. The dequantize threshold defaults to the kernels' own crossover.
template <typename T>
struct Q4Codes;
template <>
struct Q4Codes<float> {
  static GateUpQ4F32 gate_up(const Kernels& k) { return k.gate_up_q4_f32; }
  static DownQ4F32 down(const Kernels& k) { return k.down_q4_f32; }
  static DequantQ4F32 dequant(const Kernels& k) { return k.dequant_q4_f32; }
  static int dequant_rows(const Kernels& k) { return k.q4_dequant_rows_f32; }
};
template <>
struct Q4Codes<bf16_t> {
  static GateUpQ4BF16 gate_up(const Kernels& k) { return k.gate_up_q4_bf16; }
  static DownQ4BF16 down(const Kernels& k) { return k.down_q4_bf16; }
  static DequantQ4BF16 dequant(const Kernels& k) { return k.dequant_q4_bf16; }
  static int dequant_rows(const Kernels& k) { return k.q4_dequant_rows_bf16; }
};

template <typename T>
struct Q4Layer {
  using Tile = TileQ4<T>;
  const Kernels& kern;
  int gate_rows, down_rows, dequant_rows;
  decltype(Q4Codes<T>::gate_up(kern)) gate_up;
  decltype(Q4Codes<T>::down(kern)) down;
  decltype(Q4Codes<T>::dequant(kern)) dequant_fn;
  const MoeProblem& p;
  int group;

  Q4Layer(const MoeProblem& pr, const Tuning& tune)
      : kern(kernels()), gate_rows(tile_rows(tune.gate_rows, kern.gate_rows_q4)),
        down_rows(tile_rows(tune.down_rows, kern.down_rows_q4)),
        dequant_rows(tune.q4_dequant_rows >= 0 ? tune.q4_dequant_rows : Q4Codes<T>::dequant_rows(kern)),
        gate_up(Q4Codes<T>::gate_up(kern)), down(Q4Codes<T>::down(kern)), dequant_fn(Q4Codes<T>::dequant(kern)),
        p(pr), group(int(pr.q4_group)) {}

  // the codes of a block: 64 (gate/up) or 32 (down) a k-row, two a byte
  Tile gate_tile(int64_t blk, const T* a, int64_t lda, int m, T* h, int64_t ldh) const {
    return {a, lda, m, int(p.d), group, static_cast<const uint8_t*>(p.w13) + blk * p.d * kBlock,
            p.s13 + blk * (p.d / group) * 4 * kBlock, 0, nullptr, 0, h, ldh};
  }
  Tile down_tile(int64_t blk, const T* a, int64_t lda, int m, float* y, int64_t ldy) const {
    return {a, lda, m, int(p.f), group, static_cast<const uint8_t*>(p.w2) + blk * p.f * kBlock / 2,
            p.s2 + blk * (p.f / group) * 2 * kBlock, 0, y, ldy, nullptr, 0};
  }
  void dequant(const Tile& t, int width, T* out) const { dequant_fn(t.w, t.k, width, t.sb, t.group, out); }
};

template <typename T, typename Q>
void run_quant(const MoeProblem& p, const Routing& r) {
  const FloatProducts<T> fp(kernels(), get_tuning());
  const Tuning& tune = fp.tune;
  const Q q(p, tune);
  // the float layouts a dequantized block takes (pairs of k for bfloat16)
  const int64_t fw13_block = round_up(p.d, Ops<T>::pair) * 2 * kBlock, fw2_block = round_up(p.f, Ops<T>::pair) * kBlock;
  auto dequantized = [&](const typename Q::Tile& t, int width, int64_t numel) {
    thread_local Scratch wbuf;
    T* wf = static_cast<T*>(wbuf.get(size_t(numel) * sizeof(T)));
    q.dequant(t, width, wf);
    return static_cast<const T*>(wf);
  };
  run_layer<T>(
      p, r, tune,
      [&](const Layer<T>& L, const Task& t, float* acc) {
        for (int b = t.block; b < t.block + t.blocks; ++b) {
          const auto tile = q.gate_tile(t.expert * L.fb + b, L.xs + t.row0 * L.dx, L.dx, t.rows,
                                        L.h + t.row0 * L.fp + b * kBlock, L.fp);
          if (t.rows > q.dequant_rows) {
            const T* wf = dequantized(tile, 2 * kBlock, fw13_block);
            fp.gate({tile.a, tile.lda, t.rows, tile.k, wf, 0, 1, acc, 2 * kBlock, false, true, tile.h, tile.ldh,
                     half_of<T>(tile.k, 2 * kBlock)},
                    t.rows);
          } else {
            quant_product(q.gate_up, tile, t.rows, q.gate_rows, tune.stream_prefetch);
          }
        }
      },
      [&](const Layer<T>& L, const Task& t) {
        for (int b = t.block; b < t.block + t.blocks; ++b) {
          const auto tile = q.down_tile(t.expert * L.db + b, L.h + t.row0 * L.fp, L.fp, t.rows,
                                        L.y + t.row0 * L.dy + b * kBlock, L.dy);
          if (t.rows > q.dequant_rows) {
            const T* wf = dequantized(tile, kBlock, fw2_block);
            fp.project({tile.a, tile.lda, t.rows, tile.k, wf, 0, 1, tile.acc, tile.ldacc, false, true, nullptr, 0,
                        half_of<T>(tile.k, kBlock)},
                       t.rows);
          } else {
            quant_product(q.down, tile, t.rows, q.down_rows, tune.stream_prefetch);
          }
        }
      });
}

// The dense product (moe.h): one "expert" holding every row, tasks over (row block, column-block
// run); float32 accumulators straight into out when out is float32 and n fills whole blocks,
// else into scratch and rounded (bfloat16) or cut to n columns on the way out.
template <typename T>
void dense_typed(const DenseProblem& p) {
  using O = Ops<T>;
  const Kernels& kern = kernels();
  Tuning tune = get_tuning();
  if (!O::slices(kern)) tune.k_slice = 0;
  const int row_block = std::max(1, tune.row_block);
  const int64_t nb = ceil_div(p.n, kBlock), block = round_up(p.k, O::pair) * kBlock;
  const bool direct = std::is_same<T, float>::value && p.n % kBlock == 0;
  const int64_t dy = direct ? p.n : nb * kBlock;
  thread_local Scratch scratch;
  float* y = direct ? static_cast<float*>(p.out) : static_cast<float*>(scratch.get(size_t(p.rows * dy * 4)));
  Routing r;
  r.count = {int32_t(p.rows)};
  r.start = {0, int32_t(p.rows)};
  const std::vector<Task> tasks = make_tasks(r, nb, row_block, std::max(1, tune.blocks_per_task), 4 * p.threads);
  const int rows = tile_rows(tune.down_rows, O::down_rows(kern));
  const auto down = O::down(kern);
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  T* out = static_cast<T*>(p.out);
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(p.threads)
  {
    drain(next, tasks, [&](const Task& t) {
      for (int b = t.block; b < t.block + t.blocks; ++b) {
        const Tile<T> tile{x + t.row0 * p.k, p.k, t.rows, int(p.k), w + b * block, 0, 1,
                           y + t.row0 * dy + b * kBlock, dy, false, true, nullptr, 0, half_of<T>(p.k, kBlock)};
        block_product(down, tile, t.rows, rows, kBlock, tune);
      }
    });
    if (!direct) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i = 0; i < p.rows; ++i) {
        const float* src = y + i * dy;
        T* dst = out + i * p.n;
        if constexpr (std::is_same<T, float>::value) {
          std::memcpy(dst, src, p.n * sizeof(float));
        } else {
          for (int64_t j = 0; j < p.n; ++j) dst[j] = f32_to_bf16(src[j]);
        }
      }
    }
  }
}

}  // namespace

void run_dense(const DenseProblem& p) {
  if (p.rows == 0) return;
  if (p.bf16) dense_typed<bf16_t>(p);
  else dense_typed<float>(p);
}

int64_t run_moe(const MoeProblem& p) {
  thread_local Routing r;
  if (p.ids64) sort_pairs(p, static_cast<const int64_t*>(p.ids), r);
  else sort_pairs(p, static_cast<const int32_t*>(p.ids), r);
  if (p.q4_group > 0 && p.bf16) run_quant<bf16_t, Q4Layer<bf16_t>>(p, r);
  else if (p.q4_group > 0) run_quant<float, Q4Layer<float>>(p, r);
  else if (p.q8 && p.bf16) run_quant<bf16_t, Q8Layer<bf16_t>>(p, r);
  else if (p.q8) run_quant<float, Q8Layer<float>>(p, r);
  else if (p.bf16) run_typed<bf16_t>(p, r);
  else run_typed<float>(p, r);
  return r.skipped;
}

}  // namespace moe_serve
