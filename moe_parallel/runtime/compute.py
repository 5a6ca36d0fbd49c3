"""The one thread of a process that runs the model's tensor work (CPU threads' OpenMP team).

Every thread that runs a parallel torch or native-kernel op becomes the master of an OpenMP
team of its own; with two such teams on a small machine, every parallel region pays a
wake-up of sleeping workers and a decode step takes about twice as long (docs/architecture.md
has the measurement). So a process
loads its model, steps it and serves its experts on one long-lived thread: `run(fn, ...)`
runs `fn` there and returns its result (exceptions included); called from that thread it runs
inline. The event loop, Ray's method threads and health probes only hand work over.

`burst()`: an attention rank of an instance whose ranks share one host's cores runs its work
after the last layer (lm_head, sampling), while every expert rank waits, on all of the
instance's cores (`set_burst`), not on its share; the ranks' OpenMP workers sleep soon after
(`rank_start.RANK_ENV`), so the borrowed threads go back to the ranks that compute next
(docs/architecture.md, "Threads", has the measurements).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None
_burst = 0  # threads for `burst()` sections; 0: none


def _start(threads: int) -> None:
    global _thread
    torch.set_num_threads(threads)  # per thread under OpenMP: this one's team
    _thread = threading.current_thread()


def executor(threads: int | None = None) -> ThreadPoolExecutor:
    """The process's compute thread (started on first use with `threads`, default torch's count)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="model-compute", initializer=_start,
                                       initargs=(threads or torch.get_num_threads(),))
            _pool.submit(lambda: None).result()
        return _pool


def on_compute_thread() -> bool:
    return threading.current_thread() is _thread


def submit(fn, *args: Any, **kwargs: Any) -> Future:
    return executor().submit(fn, *args, **kwargs)


def run(fn, *args: Any, **kwargs: Any):
    """`fn(*args, **kwargs)` on the compute thread; inline when already there."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


def set_burst(threads: int) -> None:
    """Threads for this process's `burst()` sections (0: they run on the thread's own count)."""
    global _burst
    _burst = max(0, int(threads))


def burst_threads() -> int:
    return _burst


@contextmanager
def burst() -> Iterator[None]:
    """Run the block on the burst threads where they are more than the thread's own."""
    own = torch.get_num_threads()
    if _burst <= own:
        yield
        return
    torch.set_num_threads(_burst)
    try:
        yield
    finally:
        torch.set_num_threads(own)
