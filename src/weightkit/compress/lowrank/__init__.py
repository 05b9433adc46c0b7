"""Low-rank compression: truncated SVD under one global parameter budget and WeLore's low-rank components,
both saved as factor pairs (:class:`~weightkit.quantized.lowrank.LowRankLinear`, weightkit's "lowrank"
format); and BitStack's residual blocks of sign matrices and vectors (weightkit's "bitstack" format), one
artifact loadable at any memory budget. :func:`weightkit.load` reads both; ``weightkit export --dense``
expands them to a plain checkpoint."""

from weightkit.compress.lowrank.bitstack import BitStackConfig, compress_bitstack
from weightkit.compress.lowrank.factor import factor_linears, truncated_factors
from weightkit.compress.lowrank.svd import SVDConfig, allocate_ranks, kept_parameters
from weightkit.compress.lowrank.welore import WeLoreConfig, welore_ranks, welore_threshold

__all__ = [
    "BitStackConfig",
    "compress_bitstack",
    "SVDConfig",
    "WeLoreConfig",
    "allocate_ranks",
    "kept_parameters",
    "truncated_factors",
    "factor_linears",
    "welore_ranks",
    "welore_threshold",
]
