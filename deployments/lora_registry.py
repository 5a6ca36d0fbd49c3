"""The LoRA adapters an app serves by name: from `lora_modules` at start, and loaded or unloaded
at run time through `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's routes and
bodies; off unless `enable_lora_loading`).

The registry lives in the ingress: a request whose `model` names an adapter is sent to the
engine with the adapter's name and directory, and each attention rank loads it into one of its
`max_loras` slots on first use. So every engine replica serves every adapter without being
told about it; unloading tells the replica it reaches to free the adapter's slots (other
replicas drop it when their slots are needed).
"""

from __future__ import annotations

from pathlib import Path

from moe_parallel.model.config import ModelConfig
from moe_parallel.model.lora import LoraError, read_adapter


class LoraRegistry:
    def __init__(self, config: ModelConfig, base_name: str, modules: dict[str, str], max_rank: int):
        self.config, self.base_name, self.max_rank = config, base_name, max_rank
        self.paths: dict[str, str] = {}
        for name, path in modules.items():
            self.add(name, path)

    def add(self, name: str, path: str) -> None:
        """Validate the adapter (config, targets, rank, tensor names and shapes; not its values)."""
        if not name or name == self.base_name:
            raise LoraError(f"lora_name {name!r} is empty or the base model's name", param="lora_name")
        if name in self.paths:
            raise LoraError(f"a LoRA adapter named {name!r} is already loaded", param="lora_name")
        read_adapter(path, self.config, self.max_rank, name, tensors=False)
        self.paths[name] = str(Path(path).resolve())

    def remove(self, name: str) -> None:
        if self.paths.pop(name, None) is None:
            raise KeyError(name)

    def resolve(self, model: str) -> tuple[str, str] | None:
        """None for the base model, (name, path) for an adapter; KeyError for anything else."""
        if model == self.base_name:
            return None
        return model, self.paths[model]
