"""``compress(model, config, data=None)``: make a model smaller (quantization, weight sharing). The config's
type picks the method.

``compress_checkpoint(model_dir, out_dir, config)`` does the same from a checkpoint directory to a new
one without loading the whole model (see :mod:`weightkit.compress.stream`).
"""

from weightkit import _callable_package
from weightkit.compress.lowrank import BitStackConfig, SVDConfig, WeLoreConfig
from weightkit.compress.model import compress
from weightkit.compress.prune import MagnitudeConfig, RandomConfig, SparseGPTConfig, WandaConfig
from weightkit.compress.quant import (
    AWQConfig,
    FlexRoundConfig,
    FP4Config,
    FP8Config,
    GPTQConfig,
    GWQConfig,
    RTNConfig,
    TernaryConfig,
    VPTQConfig,
)
from weightkit.compress.share import DictionaryConfig, FoldGPTConfig, RecursiveConfig
from weightkit.compress.stream import compress_checkpoint

__all__ = [
    "compress",
    "compress_checkpoint",
    "RTNConfig",
    "GPTQConfig",
    "AWQConfig",
    "FlexRoundConfig",
    "FP8Config",
    "FP4Config",
    "TernaryConfig",
    "VPTQConfig",
    "GWQConfig",
    "RecursiveConfig",
    "SVDConfig",
    "WeLoreConfig",
    "DictionaryConfig",
    "FoldGPTConfig",
    "BitStackConfig",
    "MagnitudeConfig",
    "RandomConfig",
    "WandaConfig",
    "SparseGPTConfig",
]


_callable_package(__name__, compress)
