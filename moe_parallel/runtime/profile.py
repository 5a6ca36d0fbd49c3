"""Where a step's time goes: named wall-clock sections, off unless a benchmark turns them on.

    with section("attention"): ...        # a block of the step's own code
    @timed("attention")                   # a function of the model's math, timed from outside

Sections nest; each records its own total (children included), and `report()` gives the
totals since `reset()`. When profiling is off a section costs one attribute read. The
timings are wall clock on the calling thread; on CPU (synchronous kernels) they add up to the
step time, on CUDA a benchmark must synchronize around them.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from contextlib import contextmanager


class _Profile:
    enabled = False
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    samples: dict[str, list[float]] = defaultdict(list)
    open: set[str] = set()  # sections being timed now: one nested in a namesake is not counted twice


def enable(on: bool = True) -> None:
    _Profile.enabled = on
    reset()
    if on:
        _time_collectives()


def _time_collectives() -> None:
    """Time every all-to-all as "comm" (ours and DeepSpeed-MoE's go through this one function)."""
    import deepspeed.comm as dist

    if getattr(dist.all_to_all_single, "_timed", False):
        return
    plain = dist.all_to_all_single

    def timed(*args, **kwargs):
        with section("comm"):
            return plain(*args, **kwargs)

    timed._timed = True
    dist.all_to_all_single = timed


def reset() -> None:
    _Profile.totals.clear()
    _Profile.counts.clear()
    _Profile.samples.clear()


def samples() -> dict[str, list[float]]:
    """Each timed occurrence of the sections named with `keep=True`, in order, since `reset()`."""
    return {k: list(v) for k, v in _Profile.samples.items()}


def report() -> dict[str, tuple[float, int]]:
    return {k: (v, _Profile.counts[k]) for k, v in _Profile.totals.items()}


def swap(on: bool | None = None) -> dict[str, tuple[float, int]]:
    """The sections timed so far; then profiling on (reset) or off, or left as it is (None)."""
    got = report()
    if on is not None:
        enable(on)
    return got


@contextmanager
def section(name: str, keep: bool = False):
    """Time the block under `name`; `keep` also records this occurrence (`samples()`)."""
    if not _Profile.enabled or name in _Profile.open:
        yield
        return
    _Profile.open.add(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - start
        _Profile.open.discard(name)
        _Profile.totals[name] += took
        _Profile.counts[name] += 1
        if keep:
            _Profile.samples[name].append(took)


def timed(name: str):
    """Decorate a function so each call is timed as section `name` (nothing but a flag read
    when profiling is off): the model's math stays free of profiling blocks."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not _Profile.enabled:
                return fn(*args, **kwargs)
            with section(name):
                return fn(*args, **kwargs)

        return run

    return wrap
