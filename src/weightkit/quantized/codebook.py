"""Vector-quantized weights (VPTQ's format): indices into small float16 codebooks of weight vectors.

A weight ``[out, in]`` is cut into vectors of ``v`` consecutive output rows within one input column; each
vector is stored as the index of a codeword of a ``[k, v]`` codebook (plus, optionally, the index of a
residual codeword added to it). How the codebooks are found is :mod:`weightkit.compress.quant.vptq`.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["CODEBOOK_DTYPE", "MAX_INDEX_BITS", "VPTQSpec", "VPTQWeight", "vptq_dequantize"]

CODEBOOK_DTYPE = torch.float16  # how codebooks are stored; every size below counts 16 bits per entry
_CODEBOOK_ENTRY_BITS = 16
# The longest index the paper and its reference kernels use: 2^16 codewords (a uint16 index).
MAX_INDEX_BITS = 16


@dataclass(frozen=True)
class VPTQSpec:
    """The codebook shape of one layer.

    Attributes:
        vector_length: ``v``, output rows per vector.
        centroids: ``k``, codewords in the main codebook, a power of two.
        residual_centroids: codewords in the residual codebook (a power of two), or 0 for none.
    """

    vector_length: int
    centroids: int
    residual_centroids: int = 0

    def __post_init__(self):
        if self.vector_length < 1:
            raise WeightkitError(f"vector length must be a positive integer, got {self.vector_length}")
        for what, k in (("centroids", self.centroids), ("residual centroids", self.residual_centroids)):
            if k == 0 and what == "residual centroids":
                continue
            if k < 2 or k & (k - 1) or k > 2**MAX_INDEX_BITS:
                raise WeightkitError(f"{what} must be a power of two from 2 to {2**MAX_INDEX_BITS}, got {k}")

    @property
    def index_bits(self) -> int:
        """Bits of the index (indices) stored per vector."""
        bits = int(math.log2(self.centroids))
        return bits + (int(math.log2(self.residual_centroids)) if self.residual_centroids else 0)

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse a weight these codebooks cannot quantize, naming the tensor."""
        if len(shape) != 2:
            raise WeightkitError(
                f"{name}: only 2-D weights can be vector-quantized, got shape {tuple(shape)}"
            )
        rows, cols = shape
        if rows % self.vector_length:
            raise WeightkitError(
                f"{name}: vector length {self.vector_length} does not divide its {rows} output rows "
                f"(shape {tuple(shape)}); choose a vector length that divides {rows}"
            )
        vectors = rows // self.vector_length * cols
        for what, k in (("codebook", self.centroids), ("residual codebook", self.residual_centroids)):
            if k > vectors:
                raise WeightkitError(
                    f"{name}: a {what} of {k} codewords is larger than the {vectors} vectors of length "
                    f"{self.vector_length} in this {rows}x{cols} weight; use fewer bits or a shorter "
                    f"vector length"
                )

    def storage_bits(self, shape: tuple[int, int], name: str = "weight") -> tuple[int, int]:
        """``(index_bits, codebook_bits)`` stored for a weight of ``shape``: ``log2(k)`` (plus
        ``log2(k_residual)``) bits per vector, and 16 bits per codebook entry."""
        self.check_shape(shape, name)
        vectors = shape[0] // self.vector_length * shape[1]
        codewords = self.centroids + self.residual_centroids
        return vectors * self.index_bits, codewords * self.vector_length * _CODEBOOK_ENTRY_BITS

    def effective_bits(self, shape: tuple[int, int], name: str = "weight") -> float:
        """Bits per weight, indices and codebooks together, for a weight of ``shape``."""
        index_bits, codebook_bits = self.storage_bits(shape, name)
        return (index_bits + codebook_bits) / (shape[0] * shape[1])


def vptq_dequantize(
    indices: Tensor,
    codebook: Tensor,
    residual_indices: Tensor | None = None,
    residual_codebook: Tensor | None = None,
) -> Tensor:
    """The weight ``[out, in]`` from indices ``[out // v, in]`` and codebooks ``[k, v]``, in their dtype.

    Element ``[r * v + i, j]`` is ``codebook[indices[r, j], i]``, plus the residual codeword's ``i``-th
    entry.
    """
    if (residual_indices is None) != (residual_codebook is None):
        raise WeightkitError("residual indices and a residual codebook go together; got only one of them")
    vectors = codebook[indices]  # [out // v, in, v]
    if residual_codebook is not None:
        vectors = vectors + residual_codebook[residual_indices]
    groups, cols, v = vectors.shape
    return vectors.transpose(1, 2).reshape(groups * v, cols)


@dataclass
class VPTQWeight:
    """A vector-quantized ``[out, in]`` weight: indices ``[out // v, in]`` (``int32``) into fp16 codebooks."""

    indices: Tensor
    codebook: Tensor  # [k, v], float16
    residual_indices: Tensor | None = None
    residual_codebook: Tensor | None = None  # [k_residual, v], float16

    @property
    def spec(self) -> VPTQSpec:
        residual = 0 if self.residual_codebook is None else self.residual_codebook.shape[0]
        return VPTQSpec(self.codebook.shape[1], self.codebook.shape[0], residual)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight in ``dtype`` (the sum of fp16 codewords is taken in ``dtype``, not in fp16)."""
        residual = None if self.residual_codebook is None else self.residual_codebook.to(dtype)
        return vptq_dequantize(self.indices, self.codebook.to(dtype), self.residual_indices, residual)
