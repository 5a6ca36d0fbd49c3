"""Small per-step host values (sampling parameters, row indices) sent to the device without a wait.

A tensor made from a Python list for a GPU is copied from pageable memory, and that copy waits
for the device's queued work. `Staging` writes the values into one pinned host buffer instead
and copies each slice asynchronously into a fresh device tensor. The buffer is reused step
after step: `reset()` at the start of a step first waits for the last step's copies (long done
by then: the step ended by reading its tokens back). On a CPU the same code runs with an
ordinary buffer, so the tests see what a GPU does.
"""

from __future__ import annotations

import torch

from moe_parallel.runtime.syncs import host_side

_ALIGN = 16


class Staging:
    def __init__(self, device: torch.device, size: int = 1 << 16):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.host = self._buffer(size)
        self.used = 0
        self.retired: list[torch.Tensor] = []  # outgrown buffers, kept until their copies are done
        self.done: torch.cuda.Event | None = None

    def _buffer(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=self.pinned)

    def reset(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        self.used = 0
        self.retired.clear()

    def put(self, values, dtype: torch.dtype) -> torch.Tensor:
        """`values` (a flat list) as a 1-D tensor of `dtype` on the device."""
        n = len(values)
        size = n * dtype.itemsize
        if self.used + size > self.host.numel():
            self.retired.append(self.host)
            self.host = self._buffer(max(2 * self.host.numel(), size))
            self.used = 0
        with host_side():
            view = self.host[self.used:self.used + size].view(dtype)
            view.copy_(torch.tensor(values, dtype=dtype, device="cpu"))
        self.used += -(-size // _ALIGN) * _ALIGN
        out = torch.empty(n, dtype=dtype, device=self.device)
        out.copy_(view, non_blocking=True)
        if self.pinned:
            self.done = self.done or torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(self.device))
        return out
