"""Reading a Mixtral checkpoint in the Hugging Face Hub layout, one tensor at a time.

`Checkpoint(dir)` finds which `*.safetensors` file holds each tensor (from
`model.safetensors.index.json` when sharded, otherwise from the files' own headers).
`load_into({name: destination})` streams each named tensor into its destination: a
preallocated parameter, or a slice of one, already on the worker's device. The file is opened
around each tensor, so only that tensor's pages are mapped at a time; the destination's
`copy_` casts the dtype and moves it to the device. Peak memory while loading is therefore the
final weights plus one tensor, whatever the checkpoint's size. `reads` lists what was read,
which the tests use to prove each worker reads exactly what it owns.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from moe_parallel.loading.progress import LoadProgress
from moe_parallel.model.config import CheckpointError

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _Tracked:
    """Counts what a source loads into the progress of the part being loaded (`track`)."""

    progress: LoadProgress | None = None

    @contextmanager
    def track(self, what: str, names: Iterable[str]) -> Iterator[None]:
        names = list(names)
        self.progress = LoadProgress(what, len(names), self.nbytes(names))
        try:
            yield
        finally:
            self.progress.close()
            self.progress = None

    def nbytes(self, names: list[str]) -> int:
        raise NotImplementedError

    def _loaded(self, tensor: torch.Tensor) -> None:
        if self.progress is not None:
            self.progress.add(tensor.numel() * tensor.element_size())

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint(_Tracked):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.file_of = self._index()
        self.reads: list[str] = []

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.glob("*.bin"))
            if pickles:
                raise CheckpointError(
                    f"{self.path}: only pickle weights ({', '.join(pickles)}) found; *.bin checkpoints are refused "
                    "because loading them can run arbitrary code. Convert them to safetensors first."
                )
            raise CheckpointError(f"{self.path}: no *.safetensors weights found")
        file_of = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                file_of.update({name: file.name for name in f.keys()})
        return file_of

    def check_present(self, names) -> None:
        missing = [name for name in names if name not in self.file_of]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: tensor {missing[0]!r} is missing from the checkpoint{more}")

    def nbytes(self, names: list[str]) -> int:
        """The stored bytes of the tensors `names` that the checkpoint holds (from the headers)."""
        by_file = defaultdict(list)
        for name in names:
            if name in self.file_of:
                by_file[self.file_of[name]].append(name)
        total = 0
        for file, held in by_file.items():
            with safe_open(self.path / file, framework="pt", device="cpu") as f:
                for name in held:
                    part = f.get_slice(name)
                    total += _ITEMSIZE.get(part.get_dtype(), 4) * int(torch.Size(part.get_shape()).numel())
        return total

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored (no shape check, no cast)."""
        self.check_present([name])
        with safe_open(self.path / self.file_of[name], framework="pt", device="cpu") as f:
            tensor = f.get_tensor(name).clone()  # not a view of the mapped file, which closes now
        self.reads.append(name)
        self._loaded(tensor)
        return tensor

    @torch.no_grad()
    def load_into(self, destinations: dict[str, torch.Tensor]) -> None:
        """Copy every named tensor into its destination, checking shapes first, one tensor at a time."""
        self.check_present(destinations)
        for name, dest in destinations.items():
            with safe_open(self.path / self.file_of[name], framework="pt", device="cpu") as f:
                found = tuple(f.get_slice(name).get_shape())
                if found != tuple(dest.shape):
                    raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(found)}, "
                                          f"expected {list(dest.shape)}")
                tensor = f.get_tensor(name)
                dest.copy_(tensor)
            self.reads.append(name)
            self._loaded(tensor)


class TensorSource(_Tracked):
    """Tensors already in memory (another library's model, a test's dict), loaded the same way."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.reads: list[str] = []

    def nbytes(self, names: list[str]) -> int:
        return sum(self.tensors[n].numel() * self.tensors[n].element_size() for n in names if n in self.tensors)

    @torch.no_grad()
    def load_into(self, destinations: dict[str, torch.Tensor]) -> None:
        for name, dest in destinations.items():
            if name not in self.tensors:
                raise CheckpointError(f"tensor {name!r} is missing")
            dest.copy_(self.tensors[name])
            self.reads.append(name)
            self._loaded(self.tensors[name])
