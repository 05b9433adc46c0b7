"""Weight-only quantization: RTN, GPTQ and AWQ to 2-8 bit integer grids, exported as compressed-tensors."""

from weightkit.compress.quant.calibrated import AWQConfig, GPTQConfig, quantize_awq, quantize_gptq
from weightkit.compress.quant.rtn import RTNConfig, quantize_rtn
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.quantized.linear import QuantizedLinear

__all__ = [
    "AWQConfig",
    "GPTQConfig",
    "QuantScheme",
    "QuantizedLinear",
    "QuantizedWeight",
    "RTNConfig",
    "quantize_awq",
    "quantize_gptq",
    "quantize_rtn",
]
