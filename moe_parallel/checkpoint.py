"""Reading a Mixtral checkpoint in the Hugging Face Hub layout, one tensor at a time.

`Checkpoint(dir)` finds which `*.safetensors` file holds each tensor (from
`model.safetensors.index.json` when sharded, otherwise from the files' own headers), and
`load(names)` memory-maps only the files that hold the requested tensors and copies out only
those tensors, checking each shape. A worker therefore reads exactly what it owns; `reads`
counts what it read, which the tests use to prove it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from moe_parallel.config import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
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

    def load(self, expected: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read the named tensors, check their shapes, cast to `dtype`."""
        missing = [name for name in expected if name not in self.file_of]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: tensor {missing[0]!r} is missing from the checkpoint{more}")
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in expected:
            by_file[self.file_of[name]].append(name)
        out = {}
        for file, names in by_file.items():
            with safe_open(self.path / file, framework="pt") as f:
                for name in names:
                    out[name] = self._read(f, name, expected[name], dtype)
        return out

    def _read(self, f, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        found = tuple(f.get_slice(name).get_shape())
        if found != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(found)}, expected {list(shape)}")
        self.reads.append(name)
        return f.get_tensor(name).to(dtype)
