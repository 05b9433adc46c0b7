"""Weight-only quantization: RTN, GPTQ and AWQ to 2-8 bit integer grids, FP8/FP4 float grids, ternary
weights (exported as compressed-tensors), VPTQ vector codebooks and GWQ grids with 16-bit outliers."""

from weightkit.compress.quant.calibrated import (
    AWQConfig,
    GPTQConfig,
    quantize_awq,
    quantize_gptq,
    quantize_vptq,
)
from weightkit.compress.quant.flexround import FlexRoundConfig, quantize_flexround
from weightkit.compress.quant.fp import FP4Config, FP8Config
from weightkit.compress.quant.gwq import GWQConfig, quantize_gwq
from weightkit.compress.quant.module import quantize_each_weight
from weightkit.compress.quant.rtn import RTNConfig
from weightkit.compress.quant.ternary import TernaryConfig, ternary_quantize
from weightkit.compress.quant.vptq import VPTQConfig
from weightkit.quantized.float_grid import FloatQuantizedWeight, FloatScheme
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.quantized.linear import FloatQuantizedLinear, QuantizedLinear

__all__ = [
    "AWQConfig",
    "FP4Config",
    "FlexRoundConfig",
    "FP8Config",
    "FloatQuantizedLinear",
    "FloatQuantizedWeight",
    "FloatScheme",
    "GPTQConfig",
    "GWQConfig",
    "QuantScheme",
    "QuantizedLinear",
    "QuantizedWeight",
    "RTNConfig",
    "TernaryConfig",
    "VPTQConfig",
    "quantize_awq",
    "quantize_each_weight",
    "quantize_flexround",
    "quantize_gptq",
    "quantize_gwq",
    "quantize_vptq",
    "ternary_quantize",
]
