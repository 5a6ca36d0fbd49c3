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
#include "ring.h"

using namespace moe_serve::ring;

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
