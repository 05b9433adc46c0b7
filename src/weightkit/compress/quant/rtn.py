"""Round-to-nearest (RTN): the calibration-free baseline every other method is measured against.

Each selected linear weight is put on a min/max grid per group and rounded independently
(``weightkit.quantized.grid.rtn_quantize``). No data is needed.
"""

from dataclasses import dataclass

from torch import nn

from weightkit.compress.quant.config import WeightQuantFields
from weightkit.compress.quant.module import quantize_linear, selected_linears
from weightkit.progress import track
from weightkit.quantized.grid import rtn_quantize
from weightkit.registry import register

__all__ = ["RTNConfig", "quantize_rtn"]


@dataclass
class RTNConfig(WeightQuantFields):
    """Round-to-nearest weight quantization (see ``WeightQuantFields`` for the fields)."""


def quantize_rtn(model: nn.Module, config: RTNConfig, *, progress: bool = True, **_unused) -> nn.Module:
    """Replace each selected ``nn.Linear`` of ``model`` by a ``QuantizedLinear`` holding its RTN grid."""
    linears = selected_linears(model, config)
    for name, linear in track(linears.items(), "RTN", total=len(linears), enabled=progress):
        quantize_linear(model, name, rtn_quantize(linear.weight.detach(), config.scheme_for(name)))
    return model


register("compress", "rtn", RTNConfig, quantize_rtn)
