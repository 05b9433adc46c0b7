"""``QuantizedLinear``: a linear layer that stores its weight on an integer grid and dequantizes on use."""

import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.compress.quant.config import WeightQuantFields
from weightkit.compress.quant.grid import QuantizedWeight, QuantScheme, dequantize
from weightkit.errors import WeightkitError
from weightkit.select import select_modules

__all__ = ["QuantizedLinear", "selected_linears", "quantize_linear"]


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


def selected_linears(model: nn.Module, config: WeightQuantFields) -> dict[str, nn.Linear]:
    """The linear layers ``config`` selects, checked up front so bad input fails before any work.

    Raises:
        WeightkitError: nothing selected, or a weight whose shape the grid cannot take (naming it).
    """
    linears = select_modules(model, targets=config.targets, ignore=config.ignore)
    if not linears:
        raise WeightkitError("no linear layer selected for quantization (check targets and ignore)")
    for name, linear in linears.items():
        config.scheme_for(name).check_shape(tuple(linear.weight.shape), f"{name}.weight")
    return linears


def quantize_linear(model: nn.Module, name: str, quantized: QuantizedWeight) -> QuantizedLinear:
    """Swap the ``nn.Linear`` called ``name`` for a ``QuantizedLinear`` holding ``quantized``."""
    layer = QuantizedLinear(quantized, model.get_submodule(name).bias)
    model.set_submodule(name, layer)
    return layer
