"""LoRA adapters (PEFT directories) on the attention ranks, many at once, batched per step.

Mixtral's fine-tuning recipe adapts the attention projections only (q, k, v, o); the expert
MLPs, which live on the expert ranks, stay shared by every adapter. So an adapter here is
refused at load if it targets anything else (experts, router gate, embeddings, lm_head, or
`modules_to_save`), naming the module and saying why.

    read_adapter(path, config, max_rank)   -> LoraAdapter (validated; tensors on the CPU)
    LoraSlots(config, max_loras, max_rank)  -> per attention rank: `max_loras` resident slots
    LoraStep                                -> one step's rows per slot; adds the deltas

A step's rows are grouped by adapter (a segmented, Punica-style product): per projection and
adapter present, `(x_rows @ A.T) @ B.T * scale` added to the base projection's output, all
inside the one forward pass that serves every sequence of the batch; rows of the base model
cost nothing. Ranks below `max_rank` are zero-padded, which adds nothing to the product.

Shapes: T tokens, n rows of one adapter, r rank (padded to R = max_rank), I in, O out.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_parallel.contract import InvalidRequest
from moe_parallel.model.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                  r"\.lora_([AB])(?:\.default)?\.weight$")
_MODULE = re.compile(r"^(?:base_model\.model\.)?(.*?)\.lora_[AB](?:\.[^.]+)?\.weight$")


class LoraError(InvalidRequest):
    """An adapter this server cannot serve, with the reason."""


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, proj) -> (A [r, I], B [O, r])


def projection_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each adaptable projection."""
    q, kv, d = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}


def read_adapter(path: str | Path, c: ModelConfig, max_rank: int, name: str = "", tensors: bool = True) -> LoraAdapter:
    """A PEFT LoRA directory, validated against the model; `tensors=False` checks without loading them."""
    path = Path(path)
    cfg = _config(path)
    rank, alpha = int(cfg.get("r", 0)), float(cfg.get("lora_alpha", cfg.get("r", 1)))
    if rank < 1:
        raise LoraError(f"{path}: adapter rank r={rank} is not a positive number")
    if rank > max_rank:
        raise LoraError(f"{path}: adapter rank {rank} exceeds max_lora_rank={max_rank}", param="lora_path")
    _check_options(path, cfg)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        found = "adapter_model.bin is a pickle file, which is refused; convert it to safetensors" \
            if (path / "adapter_model.bin").exists() else "adapter_model.safetensors is missing"
        raise LoraError(f"{path}: {found}", param="lora_path")
    from safetensors import safe_open

    weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    shapes = projection_shapes(c)
    with safe_open(weights_file, framework="pt", device="cpu") as f:
        for key in f.keys():
            layer, proj, which = _parse_key(path, key)
            if not 0 <= layer < c.num_layers:
                raise LoraError(f"{path}: {key} names layer {layer}; the model has {c.num_layers}", param="lora_path")
            out, inp = shapes[proj]
            want = (rank, inp) if which == "A" else (out, rank)
            got = tuple(f.get_slice(key).get_shape())
            if got != want:
                raise LoraError(f"{path}: {key} has shape {list(got)}, expected {list(want)}", param="lora_path")
            weights.setdefault((layer, proj), {})[which] = f.get_tensor(key).float() if tensors else torch.empty(0)
    incomplete = [f"layer {k[0]} {k[1]}" for k, v in weights.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise LoraError(f"{path}: lora_A or lora_B is missing for {incomplete[0]}", param="lora_path")
    if not weights:
        raise LoraError(f"{path}: the adapter holds no LoRA weights", param="lora_path")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return LoraAdapter(name or path.name, str(path), rank, scale, {k: (v["A"], v["B"]) for k, v in weights.items()})


def _config(path: Path) -> dict:
    file = path / "adapter_config.json"
    if not path.is_dir() or not file.is_file():
        raise LoraError(f"{path}: not a PEFT adapter directory (no adapter_config.json)", param="lora_path")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LoraError(f"{path}: adapter_config.json is not valid JSON: {exc}", param="lora_path") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA", param="lora_path")
    return cfg


def _check_options(path: Path, cfg: dict) -> None:
    if cfg.get("modules_to_save"):
        raise LoraError(f"{path}: modules_to_save {cfg['modules_to_save']} is not supported: fully trained copies of "
                        "modules would replace the shared weights; adapters here add LoRA deltas to attention only",
                        param="lora_path")
    for option, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(option) == bad:
            raise LoraError(f"{path}: {option}={bad} is not supported", param="lora_path")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{path}: bias={cfg['bias']!r} is not supported (LoRA without bias terms only)",
                        param="lora_path")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    off = [t for t in targets if t not in PROJECTIONS and not any(t.endswith(p) for p in PROJECTIONS)]
    if off and not all(t.startswith(("(", ".*")) or "|" in t for t in off):  # a regex is checked on the keys
        raise LoraError(f"{path}: target module {off[0]!r} is not an attention projection; {_WHY}", param="lora_path")


_WHY = ("adapters apply to the attention projections (q_proj, k_proj, v_proj, o_proj) on the attention ranks; "
        "the experts, router gate, embeddings and lm_head are shared by every adapter")


def _parse_key(path: Path, key: str) -> tuple[int, str, str]:
    m = _KEY.match(key)
    if m is not None:
        return int(m.group(1)), m.group(2), m.group(3)
    module = _MODULE.match(key)
    what = module.group(1) if module else key
    raise LoraError(f"{path}: adapter weight {key!r} targets {what!r}, which is not an attention projection; {_WHY}",
                    param="lora_path")


class LoraSlots:
    """One attention rank's resident adapters: `max_loras` slots of stacked A and B per layer and
    projection, filled on demand from the adapters' directories (least recently used goes first)."""

    def __init__(self, c: ModelConfig, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.config, self.max_loras, self.max_rank = c, max_loras, max_rank
        self.dtype, self.device = dtype, device
        self.a: dict[tuple[int, str], torch.Tensor] = {}  # [S, R, I]
        self.b: dict[tuple[int, str], torch.Tensor] = {}  # [S, O, R]
        for layer in range(c.num_layers):
            for proj, (out, inp) in projection_shapes(c).items():
                self.a[(layer, proj)] = torch.zeros(max_loras, max_rank, inp, dtype=dtype, device=device)
                self.b[(layer, proj)] = torch.zeros(max_loras, out, max_rank, dtype=dtype, device=device)
        self.scale = [0.0] * max_loras
        self.present: list[set[tuple[int, str]]] = [set() for _ in range(max_loras)]  # what each slot adapts
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.path_of: dict[str, str] = {}  # name -> the directory its slot was loaded from
        self.loads = 0

    def ensure(self, wanted: dict[str, str]) -> dict[str, str]:
        """Make the adapters of `wanted` (name -> path) resident; return name -> why, for those
        that could not be loaded (their sequences fail, the step goes on without them). A name
        loaded again from another directory is reloaded."""
        if len(wanted) > self.max_loras:
            raise LoraError(f"{len(wanted)} adapters in one step on one rank exceed max_loras={self.max_loras}")
        failed = {}
        for name, path in wanted.items():
            if self.path_of.get(name) == path:
                self.slot_of.move_to_end(name)
                continue
            try:
                self._load(name, path, keep=set(wanted))
            except (LoraError, OSError, RuntimeError) as exc:  # missing or damaged on this node
                failed[name] = f"LoRA adapter {name!r} could not be loaded: {exc}"
        return failed

    def drop(self, name: str) -> None:
        slot = self.slot_of.pop(name, None)
        self.path_of.pop(name, None)
        if slot is not None:
            self._clear(slot)

    @torch.no_grad()
    def _load(self, name: str, path: str, keep: set[str]) -> None:
        adapter = read_adapter(path, self.config, self.max_rank, name)  # before any slot is touched
        if name in self.slot_of:  # the same name from another directory: its own slot, refilled
            free = [self.slot_of.pop(name)]
        else:
            used = set(self.slot_of.values())
            free = [s for s in range(self.max_loras) if s not in used]
        if not free:
            victim = next(n for n in self.slot_of if n not in keep)
            free = [self.slot_of.pop(victim)]
            self.path_of.pop(victim, None)
        slot = free[0]
        self._clear(slot)
        r = adapter.rank
        for key, (a, b) in adapter.weights.items():
            self.a[key][slot, :r].copy_(a)
            self.b[key][slot, :, :r].copy_(b)
        self.scale[slot] = adapter.scale
        self.present[slot] = set(adapter.weights)
        self.slot_of[name], self.path_of[name] = slot, path
        self.loads += 1

    def _clear(self, slot: int) -> None:
        for key in self.present[slot]:
            self.a[key][slot].zero_()
            self.b[key][slot].zero_()
        self.present[slot], self.scale[slot] = set(), 0.0


class LoraStep:
    """One step's (or micro-batch's) rows grouped by adapter slot; adds the LoRA deltas."""

    def __init__(self, slots: LoraSlots, segments: list[tuple[int, torch.Tensor]]):
        self.slots, self.segments = slots, segments  # (slot, token rows [n])

    def add(self, layer: int, proj: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [T, O] + each adapter's (x @ A.T) @ B.T * scale on its rows (x [T, I])."""
        key = (layer, proj)
        for slot, rows in self.segments:
            if key not in self.slots.present[slot]:
                continue
            a, b = self.slots.a[key][slot], self.slots.b[key][slot]  # [R, I], [O, R]
            delta = (x.index_select(0, rows) @ a.T) @ b.T  # [n, O]
            out.index_add_(0, rows, delta * self.slots.scale[slot])
        return out

    def add_qkv(self, layer: int, x: torch.Tensor, qkv: torch.Tensor, split: tuple[int, int, int]) -> torch.Tensor:
        """The fused q/k/v output [T, q + 2kv] with each projection's delta added to its columns."""
        parts = list(qkv.split(split, dim=-1))
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            parts[i] = self.add(layer, proj, x, parts[i].clone())
        return torch.cat(parts, dim=-1)
