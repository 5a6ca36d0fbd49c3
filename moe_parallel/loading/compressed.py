"""Pre-quantized checkpoints in the compressed-tensors format (vLLM's standard; llm-compressor's
output), for the experts: W8A16 (int8, per channel, symmetric) and W4A16 (int4, per group)
stored `pack-quantized`.

`config.json`'s `quantization_config` (quant_method "compressed-tensors") names the scheme;
each quantized expert linear `...experts.E.w1` is stored as `weight_packed` (codes packed into
int32), `weight_scale`, `weight_shape` and, when asymmetric, a packed `weight_zero_point`.
`checkpoint_quant` reads the scheme; `CompressedSource` unpacks each expert linear with the
library's own `unpack_from_int32` into the same `Quantized` codes, scales and zero points that
online quantization makes (`quant.py`), and hands the dense tensors, stored as plain floats,
to the ordinary loader. Checkpoints whose dense layers are quantized too, or that quantize
activations, are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_parallel.loading.checkpoint import Checkpoint
from moe_parallel.model.config import CheckpointError
from moe_parallel.model.quant import QuantConfig, Quantized, QuantSink

METHOD = "compressed-tensors"


def checkpoint_quant(path: str | Path) -> QuantConfig | None:
    """The experts' scheme of a compressed-tensors checkpoint, or None for a float checkpoint."""
    raw = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    if not raw:
        return None
    if raw.get("quant_method") != METHOD:
        raise CheckpointError(f"{path}: quantization_config with quant_method {raw.get('quant_method')!r} is not "
                              f"supported; this server reads {METHOD!r} checkpoints (W8A16 / W4A16 pack-quantized)")
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(raw)
    if config.format != "pack-quantized":
        raise CheckpointError(f"{path}: compressed-tensors format {config.format!r} is not supported "
                              "(expected 'pack-quantized')")
    schemes = [s for s in config.config_groups.values() if not isinstance(s, list)]
    if len(schemes) != 1:
        raise CheckpointError(f"{path}: expected one quantization scheme, found {len(config.config_groups)}")
    scheme = schemes[0]
    w = scheme.weights
    if scheme.input_activations is not None or w is None or w.type != "int" or w.dynamic:
        raise CheckpointError(f"{path}: only weight-only integer quantization (W8A16, W4A16) is supported")
    if w.num_bits == 8 and w.strategy == "channel" and w.symmetric:
        return QuantConfig("int8")
    if w.num_bits == 4 and w.strategy == "group":
        return QuantConfig("int4", group_size=w.group_size, symmetric=w.symmetric)
    raise CheckpointError(f"{path}: {w.num_bits}-bit {w.strategy} quantization "
                          f"({'symmetric' if w.symmetric else 'asymmetric'}) is not supported: int8 per channel "
                          "(symmetric) or int4 per group")


class CompressedSource:
    """Loads from a compressed-tensors checkpoint: quantized expert linears into `QuantSink`s,
    everything else as plain float tensors."""

    def __init__(self, ckpt: Checkpoint, quant: QuantConfig):
        self.ckpt, self.quant = ckpt, quant

    @property
    def reads(self) -> list[str]:
        return self.ckpt.reads

    def track(self, what: str, names):
        """Progress over what is stored for `names`: a float tensor, or a quantized one's parts."""
        parts = [f"{n.removesuffix('.weight')}.{part}" for n in names
                 for part in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")]
        return self.ckpt.track(what, [n for n in (*names, *parts) if n in self.ckpt.file_of])

    def load_into(self, destinations: dict) -> None:
        plain = {}
        for name, dest in destinations.items():
            prefix = name.removesuffix(".weight")
            if f"{prefix}.weight_packed" not in self.ckpt.file_of:
                plain[name] = dest
                continue
            if not isinstance(dest, QuantSink):
                raise CheckpointError(f"{self.ckpt.path}: {prefix} is quantized in the checkpoint; this server "
                                      "reads quantized expert weights only (dense layers must be stored as floats)")
            dest.matrix.put(dest.start, self.read(prefix, tuple(dest.shape)))
        self.ckpt.load_into(plain)

    def read(self, prefix: str, shape: tuple[int, int]) -> Quantized:
        from compressed_tensors.compressors import unpack_from_int32

        bits = self.quant.bits
        stored = tuple(self.ckpt.read(f"{prefix}.weight_shape").tolist())
        if stored != shape:
            raise CheckpointError(f"{self.ckpt.path}: tensor {prefix!r} has shape {list(stored)}, "
                                  f"expected {list(shape)}")
        codes = unpack_from_int32(self.ckpt.read(f"{prefix}.weight_packed"), bits, torch.Size(shape))
        scale = self.ckpt.read(f"{prefix}.weight_scale").float()
        zero = None
        if not self.quant.is_symmetric:
            zero = unpack_from_int32(self.ckpt.read(f"{prefix}.weight_zero_point"), bits, scale.shape, packed_dim=0)
        return Quantized(codes.to(torch.int8), scale, None if zero is None else zero.to(torch.int8))
