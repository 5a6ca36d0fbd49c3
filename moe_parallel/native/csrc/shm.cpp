// Single-producer single-consumer byte rings in shared memory (moe_parallel/parallel/shm.py).
//
// A ring is a control block of two cache lines (the producer's `head` and the consumer's `tail`,
// both monotonic byte counts) and `cap` bytes of data. The producer copies into
// [head % cap, ...) while head - tail < cap and then publishes head; the consumer copies out of
// [tail % cap, ...) while tail < head and then publishes tail. A side that cannot move spins for
// `spin_ns`, then sleeps on a futex word next to the counter it waits for (shared futex: the
// ring's pages are mapped by several processes), so a waiting rank gives its core to the rank
// that computes; a publisher makes the wake-up syscall only when the other side says it sleeps.
//
// Every call waits at most `slice_ns` and returns how many bytes it moved (possibly 0): the
// caller (Python) checks its deadline and the peer's liveness between slices, and an attention
// rank drains its incoming rings while an outgoing one is full (no cycle of full rings).
//
// Plain C entry points (called through ctypes, which releases the GIL): no torch types here.
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

namespace {

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

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t seen, int64_t timeout_ns) {
  if (timeout_ns <= 0) return;
  timespec ts{static_cast<time_t>(timeout_ns / 1000000000), static_cast<long>(timeout_ns % 1000000000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, seen, &ts, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, 0x7fffffff, nullptr, nullptr, 0);
}

void publish(Side& side, uint64_t value) {
  side.count.store(value, std::memory_order_seq_cst);  // after the data copies (seq_cst: a full fence)
  side.seq.fetch_add(1, std::memory_order_seq_cst);
  if (side.waiters.load(std::memory_order_seq_cst)) futex_wake(&side.seq);
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

}  // namespace

extern "C" {

__attribute__((visibility("default"))) uint64_t moe_ring_ctl_bytes() { return sizeof(RingCtl); }

// Copies up to n bytes of src into the ring; returns the bytes written (< n when the ring stayed
// full for slice_ns).
__attribute__((visibility("default"))) int64_t moe_ring_write(void* ctl_ptr, uint8_t* data, uint64_t cap,
                                                               const uint8_t* src, uint64_t n, int64_t spin_ns,
                                                               int64_t slice_ns) {
  RingCtl& ctl = *static_cast<RingCtl*>(ctl_ptr);
  uint64_t head = ctl.head.count.load(std::memory_order_relaxed), done = 0;
  while (done < n) {
    const uint64_t tail = wait_for(ctl.tail, [&](uint64_t t) { return head - t < cap; }, spin_ns, slice_ns);
    uint64_t room = cap - (head - tail);
    if (room == 0) break;
    while (room && done < n) {
      const uint64_t at = head % cap, len = std::min({room, n - done, cap - at});
      std::memcpy(data + at, src + done, len);
      head += len, done += len, room -= len;
    }
    publish(ctl.head, head);
  }
  return static_cast<int64_t>(done);
}

// Copies up to n bytes out of the ring into dst; returns the bytes read (< n when the ring stayed
// empty for slice_ns). slice_ns = 0: only what is there now.
__attribute__((visibility("default"))) int64_t moe_ring_read(void* ctl_ptr, const uint8_t* data, uint64_t cap,
                                                              uint8_t* dst, uint64_t n, int64_t spin_ns,
                                                              int64_t slice_ns) {
  RingCtl& ctl = *static_cast<RingCtl*>(ctl_ptr);
  uint64_t tail = ctl.tail.count.load(std::memory_order_relaxed), done = 0;
  while (done < n) {
    const uint64_t head = wait_for(ctl.head, [&](uint64_t h) { return h > tail; }, spin_ns, slice_ns);
    uint64_t ready = head - tail;
    if (ready == 0) break;
    while (ready && done < n) {
      const uint64_t at = tail % cap, len = std::min({ready, n - done, cap - at});
      std::memcpy(dst + done, data + at, len);
      tail += len, done += len, ready -= len;
    }
    publish(ctl.tail, tail);
  }
  return static_cast<int64_t>(done);
}

// Bytes the consumer can read now (the producer's head minus the consumer's tail).
__attribute__((visibility("default"))) uint64_t moe_ring_ready(void* ctl_ptr) {
  RingCtl& ctl = *static_cast<RingCtl*>(ctl_ptr);
  return ctl.head.count.load(std::memory_order_acquire) - ctl.tail.count.load(std::memory_order_relaxed);
}

}  // extern "C"
