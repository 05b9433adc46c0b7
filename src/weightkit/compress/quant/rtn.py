"""Round-to-nearest (RTN): the calibration-free baseline every other method is measured against.

Each selected linear weight is put on a min/max grid per group and rounded independently
(``weightkit.quantized.grid.rtn_quantize``). No data is needed.
"""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from weightkit.compress.quant.config import WeightQuantFields
from weightkit.compress.quant.module import quantize_each_weight
from weightkit.quantized.grid import QuantizedWeight, rtn_quantize
from weightkit.registry import register

__all__ = ["RTNConfig"]


@dataclass
class RTNConfig(WeightQuantFields):
    """Round-to-nearest weight quantization (see ``WeightQuantFields`` for the fields)."""

    LABEL: ClassVar[str] = "RTN"

    def quantize_weight(self, weight: Tensor, module_name: str, name: str) -> QuantizedWeight:
        """The RTN grid of ``weight``, the weight of module ``module_name`` (``name`` in messages)."""
        return rtn_quantize(weight, self.scheme_for(module_name), name=name)


register("compress", "rtn", RTNConfig, quantize_each_weight)
