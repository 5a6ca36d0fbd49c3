"""A rank's loading, told as it goes: tensors and bytes done, the rate, the time left.

A real checkpoint is minutes of reading (Mixtral-8x7B: 93 GB over its ranks), and a worker
that says nothing for minutes looks hung. Each part a rank loads (its dense weights, its
experts) logs a line when it starts, then at most one line per `EVERY_S` seconds and per
`STEP` of its bytes, and one when it is done; where stderr is a terminal a tqdm bar runs too.
The lines go to the `moe_parallel.loading` logger (to stderr where nothing else is set up, so a
rank process, a Ray actor and `serve run` all show them).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("moe_parallel.loading")
EVERY_S = 5.0  # at most one progress line this often...
STEP = 0.05  # ...and per this fraction of the bytes
# where this process's loading is also reported, (part, bytes done, bytes in all), with each
# line: the serving app sets it so that /health can say how far the model is
reporter: Callable[[str, int, int], None] | None = None


def _logger() -> logging.Logger:
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
        if not logging.getLogger().handlers:  # nothing set up in this process: say it on stderr
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.propagate = False
    return log


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


class LoadProgress:
    def __init__(self, what: str, tensors: int, nbytes: int):
        self.what, self.tensors, self.total = what, tensors, max(nbytes, 1)
        self.done_tensors = self.done_bytes = 0
        self.start = self.last_time = time.monotonic()
        self.last_bytes = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what, leave=False)
        _logger().info("loading %s: %d tensors, %s", what, tensors, _size(nbytes))
        self._report()

    def add(self, nbytes: int) -> None:
        self.done_tensors += 1
        self.done_bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        now = time.monotonic()
        if (now - self.last_time < EVERY_S or self.done_bytes - self.last_bytes < STEP * self.total
                or self.done_bytes >= self.total):
            return
        rate = self.done_bytes / max(now - self.start, 1e-9)
        left = (self.total - self.done_bytes) / max(rate, 1e-9)
        _logger().info("loading %s: %d/%d tensors, %s of %s (%.0f%%), %s/s, about %.0f s left", self.what,
                       self.done_tensors, self.tensors, _size(self.done_bytes), _size(self.total),
                       100 * self.done_bytes / self.total, _size(rate), left)
        self.last_time, self.last_bytes = now, self.done_bytes
        self._report()

    def _report(self) -> None:
        if reporter is not None:
            try:
                reporter(self.what, self.done_bytes, self.total)
            except Exception:  # telling is best effort: loading goes on
                log.debug("loading report failed", exc_info=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._report()
        took = time.monotonic() - self.start
        _logger().info("loaded %s: %d tensors, %s in %.1f s (%s/s)", self.what, self.done_tensors,
                       _size(self.done_bytes), took, _size(self.done_bytes / max(took, 1e-9)))
