"""Round-to-nearest (RTN): the calibration-free baseline every other method is measured against.

Each selected linear weight is put on a min/max grid per group and rounded independently
(``weightkit.quantized.grid.rtn_quantize``). No data is needed.
"""

from dataclasses import dataclass

import torch
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


def quantize_rtn(
    model: nn.Module,
    config: RTNConfig,
    *,
    progress: bool = True,
    device: torch.device | None = None,
    **_unused,
) -> nn.Module:
    """Replace each selected ``nn.Linear`` of ``model`` by a ``QuantizedLinear`` holding its RTN grid.

    With a ``device``, each weight is rounded there, one at a time, and its quantized layer moved back
    to where the weight was; without one, where the weight is.
    """
    linears = selected_linears(model, config)
    for name, linear in track(linears.items(), "RTN", total=len(linears), enabled=progress):
        weight = linear.weight.detach()
        quantized = rtn_quantize(
            weight.to(device or weight.device), config.scheme_for(name), name=f"{name}.weight"
        )
        quantize_linear(model, name, quantized).to(weight.device)
    return model


register("compress", "rtn", RTNConfig, quantize_rtn)
