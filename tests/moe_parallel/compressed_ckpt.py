"""Pre-quantized compressed-tensors checkpoints made on the fly from a float one, with the
library's own quantization parameters and compressor (as llm-compressor does)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from moe_parallel.model.quant import QuantConfig


def write_compressed(src: Path, out: Path, quant: QuantConfig) -> Path:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    args = quant.args()
    scheme = QuantizationScheme(targets=["re:.*block_sparse_moe\\.experts\\..*"], weights=args)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors |= load_file(file)
    stored = {}
    for name, w in tensors.items():
        if ".experts." not in name:
            stored[name] = w
            continue
        if args.strategy == "group":
            groups = w.view(w.shape[0], -1, args.group_size)
            low, high = groups.amin(-1), groups.amax(-1)
        else:
            low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        scale, zero = calculate_qparams(low, high, args)
        prefix = name.removesuffix(".weight")
        packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero},
                                                       scheme)
        stored |= {f"{prefix}.{k}": v.contiguous() for k, v in packed.items()}
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed",
        ignore=["lm_head", "re:.*self_attn.*", "re:.*block_sparse_moe\\.gate$"]).model_dump(mode="json")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
