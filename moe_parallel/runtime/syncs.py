"""Finding the host-device round trips in a block of code, on any device.

On a GPU, every read of a device value on the host (`.item()`, `.tolist()`, `bool(t)`, a
boolean-mask index, `nonzero`) waits for the device to finish all queued work, and every
tensor made from a Python list is a copy from pageable memory that waits too. The decode step
is built to have none before its sampled tokens are read (`decode.py`). `HostSyncs` records
each such call made inside it (the operation's name), so a test on the CPU can state which
ones a step makes; on CUDA, `torch.cuda.set_sync_debug_mode` catches the rest.

    with HostSyncs() as syncs:
        runner.step(batch)
    assert syncs.calls == []
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# Reads of a device value on the host (bincount sizes its output from the largest value: on CUDA a read)
READS = {T.item: "item", T.tolist: "tolist", T.__bool__: "bool", T.__int__: "int", T.__float__: "float",
         T.__index__: "index", T.nonzero: "nonzero", torch.nonzero: "nonzero", T.cpu: "cpu", T.numpy: "numpy",
         T.masked_select: "masked_select", torch.masked_select: "masked_select", T.unique: "unique",
         torch.unique: "unique", T.bincount: "bincount", torch.bincount: "bincount"}
# Tensors made from host data for a device (`device=` given: a copy that waits, when it goes to
# a GPU from pageable memory); work marked `host_side()` (staging buffers) is not counted
UPLOADS = {torch.tensor: "tensor", torch.as_tensor: "as_tensor"}
_UPLOAD_NAMES = {"tensor", "as_tensor", "list_index"}
_INDEXING = {T.__getitem__, T.__setitem__, T.index_put_, T.index_put}
_host = threading.local()


@contextmanager
def host_side():
    """Marks work on host memory only (filling a staging buffer): not recorded."""
    before = getattr(_host, "on", False)
    _host.on = True
    try:
        yield
    finally:
        _host.on = before


class HostSyncs(TorchFunctionMode):
    """Records every call inside the block that makes the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_host, "on", False):
            return func(*args, **kwargs)
        name = READS.get(func) or (UPLOADS.get(func) if kwargs.get("device") is not None else None)
        if func in (torch.where, torch.repeat_interleave, T.repeat_interleave):
            name = _size_from_data(func, args, kwargs)
        elif func in _INDEXING:
            name = _index_kind(args[1] if len(args) > 1 else kwargs.get("indices"))
        if name:
            self.calls.append(name)
        return func(*args, **kwargs)

    @property
    def reads(self) -> list[str]:
        """The calls that read a device value back (uploads left out)."""
        return [c for c in self.calls if c not in _UPLOAD_NAMES]


def _size_from_data(func, args, kwargs) -> str | None:
    """`where(cond)` with one argument, and `repeat_interleave` with a tensor of repeats and no
    `output_size`, size their output from the data."""
    if func is torch.where:
        return "where" if len(args) + len(kwargs) == 1 else None
    if func is torch.repeat_interleave and len(args) == 1 and "repeats" not in kwargs:
        repeats = args[0]  # repeat_interleave(repeats): arange repeated
    else:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
        return "repeat_interleave"
    return None


def _index_kind(index) -> str | None:
    """A boolean-mask index reads the mask back (its size is data); a Python list as an index is
    made into a tensor on the host and copied over."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
        return "bool_index"
    if any(isinstance(i, list) for i in items):
        return "list_index"
    return None
