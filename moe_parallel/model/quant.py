"""Weight-only quantization: int8 per output channel, int4 per group of inputs.

    QuantConfig("int8")                     symmetric, one scale per output channel
    QuantConfig("int4", group_size=128)     asymmetric, a scale and a zero point per group

The quantization math is compressed-tensors' own (`calculate_qparams`, `quantize`), so a
weight quantized here while it streams in and the same weight read from a compressed-tensors
checkpoint (llm-compressor's W8A16 / W4A16 `pack-quantized` output) are the same codes,
scales and zero points, and serve the same tokens.

A `QuantMatrix` is one logical weight [O, I] on a device, filled row block by row block
(`put`: w1 and w3 go into one fused w13) and applied with `linear(x)`. On the CPU it is laid
out for PyTorch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`),
which are fast with bfloat16 activations and slow with float32 ones, so the activations are
cast to bfloat16 for the product and back (docs/architecture.md, "Quantized experts", has the
measurement). On other devices the weight is dequantized in the activation dtype and multiplied.

Shapes: O output features, I input features, G group size, n rows of x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCHEMES = ("none", "int8", "int4")
CPU_KERNEL_DTYPE = torch.bfloat16  # the dtype the CPU int8/int4 kernels are fast with


@dataclass(frozen=True)
class QuantConfig:
    scheme: str = "none"
    group_size: int = 128  # int4 only
    symmetric: bool | None = None  # default: int8 symmetric, int4 asymmetric
    kernel: str = "auto"  # "auto": packed kernels on CPU, dequantize elsewhere; "dequantize" forces the latter

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.scheme == "int4" and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256 (got {self.group_size})")
        if self.symmetric is None:  # the defaults, spelt out, so equal schemes compare equal
            object.__setattr__(self, "symmetric", self.scheme == "int8")
        if self.scheme == "int8" and self.symmetric is False:
            raise ValueError("int8 is symmetric per output channel (its kernel takes no zero point)")
        if self.kernel not in ("auto", "dequantize"):
            raise ValueError(f"kernel {self.kernel!r} is not 'auto' or 'dequantize'")

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    @property
    def bits(self) -> int:
        return {"none": 0, "int8": 8, "int4": 4}[self.scheme]

    @property
    def is_symmetric(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.scheme == "int8"

    def args(self):
        """compressed-tensors' QuantizationArgs for this scheme."""
        from compressed_tensors.quantization import QuantizationArgs

        if self.scheme == "int8":
            return QuantizationArgs(num_bits=8, symmetric=self.is_symmetric, strategy="channel")
        return QuantizationArgs(num_bits=4, symmetric=self.is_symmetric, strategy="group", group_size=self.group_size)

    def check_shape(self, rows: int, cols: int, name: str) -> None:
        if self.scheme == "int4" and cols % self.group_size:
            raise ValueError(f"{name}: {cols} input features are not a multiple of group_size={self.group_size}")
        if self.scheme == "int4" and rows % 64:  # the CPU int4 layout packs rows in blocks of 64
            raise ValueError(f"{name}: {rows} output features are not a multiple of 64")

    def bytes_per_weight(self) -> float:
        """Stored bytes per weight, scales and zero points included (for planning)."""
        if self.scheme == "int8":
            return 1.0
        if self.scheme == "int4":
            return 0.5 + 4.0 / self.group_size  # bf16 scale and zero per group
        return 0.0


NO_QUANT = QuantConfig()


@dataclass
class Quantized:
    """Codes [O, I] int8 (signed: int8 in [-128, 127], int4 in [-8, 7]), scale and zero point
    [O, 1] (channel) or [O, I/G] (group); zero is None when symmetric."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def quantize(w: torch.Tensor, cfg: QuantConfig) -> Quantized:
    """compressed-tensors' weight quantization of w [O, I] (computed in float32)."""
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w, args = w.float(), cfg.args()
    if cfg.scheme == "int4":
        groups = w.view(w.shape[0], -1, cfg.group_size)  # [O, I/G, G]
        low, high = groups.amin(-1), groups.amax(-1)
    else:
        low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale, zero = calculate_qparams(low, high, args)
    codes = ct_quantize(x=w, scale=scale, zero_point=zero, args=args, dtype=torch.int8)
    return Quantized(codes, scale, None if cfg.is_symmetric else zero.to(torch.int8))


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the codes stand for, [O, I]: (codes - zero) * scale, group by group."""
    groups = q.scale.shape[1]
    codes = q.codes.view(q.codes.shape[0], groups, -1).float()  # [O, groups, I/groups]
    zero = 0.0 if q.zero is None else q.zero.float()[..., None]
    return ((codes - zero) * q.scale.float()[..., None]).view(q.codes.shape).to(dtype)


def matrix_bytes(rows: int, cols: int, cfg: QuantConfig, scale_bytes: int = 2) -> int:
    """Bytes a quantized [rows, cols] weight occupies: codes, then scales (and int4 zero points)."""
    if cfg.scheme == "int8":
        return rows * cols + rows * scale_bytes
    return rows * cols // 2 + 2 * rows * (cols // cfg.group_size) * scale_bytes


class QuantMatrix:
    """One quantized weight [O, I] on a device, in the layout its kernel wants:

    | scheme | codes                                   | scales                         |
    | ------ | --------------------------------------- | ------------------------------ |
    | int8   | int8 [O, I]                             | [O, 1]                         |
    | int4   | uint8 [O, I/2], two codes a byte        | CPU: [I/G, O, 2] scale and zero; else [O, I/G] each |

    The CPU int4 codes are in PyTorch's `_convert_weight_to_int4pack_for_cpu` order; elsewhere
    they are plain nibbles (low nibble first), unpacked when dequantizing."""

    def __init__(self, rows: int, cols: int, cfg: QuantConfig, device: torch.device, act_dtype: torch.dtype):
        self.rows, self.cols, self.cfg, self.device = rows, cols, cfg, torch.device(device)
        self.packed = cfg.kernel == "auto" and self.device.type == "cpu"
        self.dtype = CPU_KERNEL_DTYPE if self.packed else act_dtype  # activations, scales, zeros
        self.zero: torch.Tensor | None = None
        if cfg.scheme == "int8":
            self.codes = torch.empty(rows, cols, dtype=torch.int8, device=self.device)
            self.scale = torch.empty(rows, 1, dtype=self.dtype, device=self.device)
            return
        g = cols // cfg.group_size
        self.codes = torch.empty(rows, cols // 2, dtype=torch.uint8, device=self.device)
        if self.packed:
            self.scale_zero = torch.empty(g, rows, 2, dtype=self.dtype, device=self.device)
        else:
            self.scale = torch.empty(rows, g, dtype=self.dtype, device=self.device)
            self.zero = torch.empty(rows, g, dtype=self.dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        parts = [self.codes, *(getattr(self, n) for n in ("scale", "zero", "scale_zero") if hasattr(self, n))]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @torch.no_grad()
    def put(self, start: int, q: Quantized) -> None:
        """Rows [start, start + q.codes.shape[0]) from quantized codes (one checkpoint tensor)."""
        rows = slice(start, start + q.codes.shape[0])
        zero = torch.zeros_like(q.scale) if q.zero is None else q.zero.float()
        if self.cfg.scheme == "int8":
            self.codes[rows] = q.codes.to(self.device)
            self.scale[rows] = q.scale.to(self.device, self.dtype)
            return
        unsigned = q.codes.to(torch.int32) + 8  # [n, I] in [0, 15]
        if self.packed:  # PyTorch's int4 form: w = (u - 8) * scale + z
            self.codes[rows] = torch._convert_weight_to_int4pack_for_cpu(unsigned.to(self.device), 1)
            self.scale_zero[:, rows, 0] = q.scale.T.to(self.device, self.dtype)
            self.scale_zero[:, rows, 1] = (-zero * q.scale).T.to(self.device, self.dtype)
            return
        nibbles = unsigned.to(torch.uint8).view(unsigned.shape[0], -1, 2)
        self.codes[rows] = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(self.device)
        self.scale[rows] = q.scale.to(self.device, self.dtype)
        self.zero[rows] = zero.to(self.device, self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, I] -> x @ W.T [n, O], in x's dtype."""
        xk = x.to(self.dtype)
        if not self.packed:
            return F.linear(xk, self.dequantized()).to(x.dtype)
        if self.cfg.scheme == "int8":
            return torch._weight_int8pack_mm(xk, self.codes, self.scale[:, 0]).to(x.dtype)
        return torch._weight_int4pack_mm_for_cpu(xk, self.codes, self.cfg.group_size, self.scale_zero).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight [O, I] in the kernel dtype (the portable path; CPU int4 has its own layout)."""
        if self.cfg.scheme == "int8":
            return self.codes.to(self.dtype) * self.scale
        if self.packed:
            raise RuntimeError("the CPU int4 layout is read by its kernel only")
        codes = torch.stack([self.codes & 15, self.codes >> 4], dim=-1).view(self.rows, -1, self.cfg.group_size)
        signed = codes.to(self.dtype) - 8  # [O, I/G, G]
        return ((signed - self.zero[..., None]) * self.scale[..., None]).view(self.rows, self.cols)


class QuantSink:
    """A loader destination that quantizes the float tensor streamed into it: `copy_(src)`
    quantizes src and stores its rows at `start` of `matrix` (so w1 and w3 fill one w13)."""

    def __init__(self, matrix: QuantMatrix, start: int, shape: tuple[int, int]):
        self.matrix, self.start, self.shape = matrix, start, torch.Size(shape)

    def copy_(self, src: torch.Tensor) -> None:
        self.matrix.put(self.start, quantize(src, self.matrix.cfg))
