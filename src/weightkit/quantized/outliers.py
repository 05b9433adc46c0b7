"""Weights on a low-bit integer grid plus a sparse set of 16-bit outliers (GWQ's format).

Every position is on the grid (an outlier's slot holds the grid's code for 0, as a dense kernel needs);
the outliers are kept as their row-major positions and 16-bit values and replace the grid value on
dequantization. Which weights are outliers is :mod:`weightkit.compress.quant.gwq`.
"""

from dataclasses import dataclass

from torch import Tensor

from weightkit.quantized.grid import QuantizedWeight, QuantScheme

__all__ = ["SparseOutlierWeight", "outlier_storage_bits"]

SCALE_BITS = 16
OUTLIER_VALUE_BITS = 16
OUTLIER_INDEX_BITS = 32


@dataclass
class SparseOutlierWeight:
    """A ``[out, in]`` weight as a low-bit grid plus a sparse set of float16 outliers.

    ``dense`` holds every position; at an outlier position its value is the grid's code for 0 and is
    replaced by the outlier on dequantization.
    """

    dense: QuantizedWeight
    outlier_index: Tensor  # int32 [k], row-major positions in [out, in], ascending
    outlier_value: Tensor  # float16 [k] (bfloat16 for a bfloat16 weight)

    def dequantize(self) -> Tensor:
        """The weight, ``[out, in]`` in the dense scale's dtype, outliers restored."""
        weight = self.dense.dequantize()
        flat = weight.reshape(-1)
        flat[self.outlier_index.long()] = self.outlier_value.to(weight.dtype)
        return weight

    def storage_bits(self) -> int:
        """Bits this weight occupies (see :func:`outlier_storage_bits`)."""
        return outlier_storage_bits(
            tuple(self.dense.qweight.shape), self.dense.scheme, len(self.outlier_index)
        )


def outlier_storage_bits(shape: tuple[int, int], scheme: QuantScheme, outliers: int) -> int:
    """Bits of a ``shape`` weight stored on ``scheme``'s grid with ``outliers`` float16 outliers.

    Packed grid (``bits`` per position) + one float16 scale per group + one ``bits``-bit zero point per
    group if asymmetric + 48 bits (float16 value, int32 position) per outlier. ``outliers=0`` is RTN.
    """
    rows, cols = shape
    groups = rows * (cols // (scheme.group_size or cols))
    zero_point_bits = 0 if scheme.symmetric else scheme.bits
    return (
        rows * cols * scheme.bits
        + groups * (SCALE_BITS + zero_point_bits)
        + outliers * (OUTLIER_VALUE_BITS + OUTLIER_INDEX_BITS)
    )
