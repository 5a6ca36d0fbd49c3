"""The one thread of a process that runs the model's tensor work (CPU threads' OpenMP team).

Every thread that runs a parallel torch or native-kernel op becomes the master of an OpenMP
team of its own; with two such teams on a small machine, every parallel region pays a
wake-up of sleeping workers and a decode step takes about twice as long (docs/architecture.md
has the measurement). So a process
loads its model, steps it and serves its experts on one long-lived thread: `run(fn, ...)`
runs `fn` there and returns its result (exceptions included); called from that thread it runs
inline. The event loop, Ray's method threads and health probes only hand work over.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None


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
