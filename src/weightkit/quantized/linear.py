"""``QuantizedLinear`` and ``FloatQuantizedLinear``: linear layers that store their weight on an integer or a
floating-point grid and dequantize on use."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.quantized.float_grid import FORMATS, FloatQuantizedWeight, FloatScheme
from weightkit.quantized.grid import QuantizedWeight, QuantScheme, dequantize

__all__ = ["QuantizedLinear", "FloatQuantizedLinear", "quantized_layer"]


class QuantizedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding int8 grid values, scales and zero points.

    Buffers: ``qweight`` (int8 ``[out, in]``), ``weight_scale`` (``[out, groups]``),
    ``weight_zero_point`` (int8 ``[out, groups]``, asymmetric grids only) and ``bias`` if any.
    The forward pass dequantizes the weight (weight-only quantization: activations stay in float).
    """

    def __init__(self, quantized: QuantizedWeight, bias: Tensor | None):
        super().__init__()
        self.scheme: QuantScheme = quantized.scheme
        self.out_features, self.in_features = quantized.qweight.shape
        self.register_buffer("qweight", quantized.qweight)
        self.register_buffer("weight_scale", quantized.scale)
        self.register_buffer("weight_zero_point", quantized.zero_point)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantized: QuantizedWeight) -> "QuantizedLinear":
        return cls(quantized, linear.bias)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.weight_scale, self.weight_zero_point, self.scheme)

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.qweight, self.weight_scale, self.weight_zero_point)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias)

    def extra_repr(self) -> str:
        s = self.scheme
        grid = "sym" if s.symmetric else "asym"
        group = f"g{s.group_size}" if s.group_size else "per-channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, int{s.bits} {grid} {group}"


class FloatQuantizedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding its weight on an FP8 or FP4 grid.

    Buffers: ``qweight_bits`` (``uint8 [out, in]``, the bits of the grid values in the format's storage
    dtype, see :mod:`weightkit.quantized.float_grid`), ``weight_scale`` (``[out, groups]``: the model's
    float dtype for FP8, the bits of the E4M3 scales as ``uint8`` for NVFP4), ``weight_global_scale_bits``
    (NVFP4 only: the float32 global scale's bits as ``int32 [1]``) and ``bias`` if any. What belongs to
    the format is held as integer bits because ``Module.to(dtype)`` / ``.half()`` cast every
    floating-point tensor, float8 ones included, and would change the stored format; FP8 scales are the
    model's precision and follow such casts, as integer grids' scales do. The forward pass dequantizes
    the weight.
    """

    def __init__(self, quantized: FloatQuantizedWeight, bias: Tensor | None):
        super().__init__()
        self.scheme: FloatScheme = quantized.scheme
        self.out_features, self.in_features = quantized.qweight.shape
        nvfp4 = quantized.global_scale is not None
        self.register_buffer("qweight_bits", quantized.qweight.view(torch.uint8))
        self.register_buffer("weight_scale", quantized.scale.view(torch.uint8) if nvfp4 else quantized.scale)
        self.register_buffer(
            "weight_global_scale_bits", quantized.global_scale.view(torch.int32) if nvfp4 else None
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> FloatQuantizedWeight:
        qweight = self.qweight_bits.view(FORMATS[self.scheme.format].dtype)
        if self.weight_global_scale_bits is None:
            return FloatQuantizedWeight(qweight, self.weight_scale, None, self.scheme)
        scale = self.weight_scale.view(torch.float8_e4m3fn)
        global_scale = self.weight_global_scale_bits.view(torch.float32)
        return FloatQuantizedWeight(qweight, scale, global_scale, self.scheme)

    def dequantized_weight(self) -> Tensor:
        return self.quantized.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias)

    def extra_repr(self) -> str:
        s = self.scheme
        group = f"g{s.group_size}" if s.group_size else "per-channel"
        pow2 = f" pow2-{s.power_of_two}" if s.power_of_two else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {s.format} {group}{pow2}"


def quantized_layer(
    quantized: QuantizedWeight | FloatQuantizedWeight, bias: Tensor | None
) -> QuantizedLinear | FloatQuantizedLinear:
    """The layer holding ``quantized``: ``QuantizedLinear`` for an integer grid, ``FloatQuantizedLinear``
    for a float one."""
    if isinstance(quantized, QuantizedWeight):
        return QuantizedLinear(quantized, bias)
    return FloatQuantizedLinear(quantized, bias)
