// The byte ring of the same-host exchange (shm.cpp has the protocol): its control block, the
// futex wait and wake, publishing, and copies that wrap at the end of the data. Shared by the
// ctypes entry points (shm.cpp) and the exchange's fused layer paths (exchange.cpp). No torch.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <ctime>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_PAUSE() _mm_pause()
#else
#define MOE_PAUSE() ((void)0)
#endif

namespace moe_serve::ring {

struct alignas(64) Side {
  std::atomic<uint64_t> count;    // bytes published by this side
  std::atomic<uint32_t> seq;      // futex word: bumped on every publish
  std::atomic<uint32_t> waiters;  // the other side sleeps on `seq` while this is non-zero
  char pad[64 - 16];
};

struct RingCtl {
  Side head;  // written by the producer
  Side tail;  // written by the consumer
};
static_assert(sizeof(RingCtl) == 128, "two cache lines");

using Clock = std::chrono::steady_clock;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

inline void futex_wait(std::atomic<uint32_t>* word, uint32_t seen, int64_t timeout_ns) {
  if (timeout_ns <= 0) return;
  timespec ts{static_cast<time_t>(timeout_ns / 1000000000), static_cast<long>(timeout_ns % 1000000000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, seen, &ts, nullptr, 0);
}

inline void futex_wake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, 0x7fffffff, nullptr, nullptr, 0);
}

// Waits until `ready(side.count)` or the slice ends; returns the last value seen.
template <typename Ready>
uint64_t wait_for(Side& side, Ready ready, int64_t spin_ns, int64_t slice_ns) {
  uint64_t v = side.count.load(std::memory_order_acquire);
  if (ready(v) || slice_ns <= 0) return v;
  const int64_t start = now_ns();
  const int64_t spin_end = start + spin_ns, end = start + slice_ns;
  while (now_ns() < spin_end) {
    for (int i = 0; i < 64; ++i) MOE_PAUSE();
    v = side.count.load(std::memory_order_acquire);
    if (ready(v)) return v;
  }
  for (;;) {
    const int64_t left = end - now_ns();
    if (left <= 0) return side.count.load(std::memory_order_acquire);
    side.waiters.fetch_add(1, std::memory_order_seq_cst);
    const uint32_t seen = side.seq.load(std::memory_order_seq_cst);
    v = side.count.load(std::memory_order_seq_cst);
    if (!ready(v)) futex_wait(&side.seq, seen, left);
    side.waiters.fetch_sub(1, std::memory_order_seq_cst);
    v = side.count.load(std::memory_order_acquire);
    if (ready(v)) return v;
  }
}

// Publishes `value` without the wake-up (`wake_if_waiting` later): a writer filling several rings
// wakes their readers only once every message is in place.
inline void publish_quiet(Side& side, uint64_t value) {
  side.count.store(value, std::memory_order_seq_cst);  // after the data copies (seq_cst: a full fence)
  side.seq.fetch_add(1, std::memory_order_seq_cst);
}

inline void wake_if_waiting(Side& side) {
  if (side.waiters.load(std::memory_order_seq_cst)) futex_wake(&side.seq);
}

inline void publish(Side& side, uint64_t value) {
  publish_quiet(side, value);
  wake_if_waiting(side);
}

// Copies n bytes into the ring at byte count `at` (wrapping at cap); room is the caller's check.
inline void put(uint8_t* data, uint64_t cap, uint64_t at, const void* src, uint64_t n) {
  const uint64_t off = at % cap, first = std::min(n, cap - off);
  std::memcpy(data + off, src, first);
  if (first < n) std::memcpy(data, static_cast<const uint8_t*>(src) + first, n - first);
}

inline void get(const uint8_t* data, uint64_t cap, uint64_t at, void* dst, uint64_t n) {
  const uint64_t off = at % cap, first = std::min(n, cap - off);
  std::memcpy(dst, data + off, first);
  if (first < n) std::memcpy(static_cast<uint8_t*>(dst) + first, data, n - first);
}

}  // namespace moe_serve::ring
