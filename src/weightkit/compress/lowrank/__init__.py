"""Low-rank compression: BitStack's residual blocks of sign matrices and vectors."""

from weightkit.compress.lowrank.bitstack import BitStackConfig, compress_bitstack

__all__ = [
    "BitStackConfig",
    "compress_bitstack",
]
