"""``QuantizedLinear`` and ``FloatQuantizedLinear``: linear layers that store their weight on an integer or a
floating-point grid and dequantize on use."""

import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.quantized.float_grid import FloatQuantizedWeight, FloatScheme, float_dequantize
from weightkit.quantized.grid import QuantizedWeight, QuantScheme, dequantize

__all__ = ["QuantizedLinear", "FloatQuantizedLinear"]


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

    Buffers: ``qweight`` (``[out, in]`` in the format's storage dtype, see
    :mod:`weightkit.quantized.float_grid`), ``weight_scale`` (``[out, groups]``), ``weight_global_scale``
    (float32 ``[1]``, NVFP4 only) and ``bias`` if any. The forward pass dequantizes the weight.
    """

    def __init__(self, quantized: FloatQuantizedWeight, bias: Tensor | None):
        super().__init__()
        self.scheme: FloatScheme = quantized.scheme
        self.out_features, self.in_features = quantized.qweight.shape
        self.register_buffer("qweight", quantized.qweight)
        self.register_buffer("weight_scale", quantized.scale)
        self.register_buffer("weight_global_scale", quantized.global_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> FloatQuantizedWeight:
        return FloatQuantizedWeight(self.qweight, self.weight_scale, self.weight_global_scale, self.scheme)

    def dequantized_weight(self) -> Tensor:
        return float_dequantize(self.qweight, self.weight_scale, self.weight_global_scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias)

    def extra_repr(self) -> str:
        s = self.scheme
        group = f"g{s.group_size}" if s.group_size else "per-channel"
        pow2 = f" pow2-{s.power_of_two}" if s.power_of_two else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {s.format} {group}{pow2}"
