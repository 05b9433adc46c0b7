"""Low-rank compression: truncated SVD under one global parameter budget, and WeLore's low-rank components.
Both save as factor pairs (:class:`~weightkit.quantized.lowrank.LowRankLinear`, weightkit's "lowrank"
format), which :func:`weightkit.load` reads and ``weightkit export --dense`` expands to a plain checkpoint."""

from weightkit.compress.lowrank.factor import factor_linears, truncated_factors
from weightkit.compress.lowrank.svd import SVDConfig, allocate_ranks, kept_parameters
from weightkit.compress.lowrank.welore import WeLoreConfig, welore_ranks, welore_threshold

__all__ = [
    "SVDConfig",
    "WeLoreConfig",
    "allocate_ranks",
    "kept_parameters",
    "truncated_factors",
    "factor_linears",
    "welore_ranks",
    "welore_threshold",
]
