"""Linear layers that store their weight quantized and dequantize it on use: ``QuantizedLinear`` (integer
grid), ``FloatQuantizedLinear`` (FP8/FP4 grid), ``VPTQLinear`` (vector codebooks) and
``OutlierQuantizedLinear`` (integer grid plus sparse 16-bit outliers)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.quantized.codebook import CODEBOOK_DTYPE, VPTQWeight
from weightkit.quantized.float_grid import FORMATS, FloatQuantizedWeight, FloatScheme
from weightkit.quantized.grid import QuantizedWeight, QuantScheme, dequantize
from weightkit.quantized.outliers import SparseOutlierWeight

__all__ = [
    "QuantizedLinear",
    "FloatQuantizedLinear",
    "VPTQLinear",
    "OutlierQuantizedLinear",
    "quantized_layer",
]


def _grid_text(scheme: QuantScheme) -> str:
    """An integer grid as layers print it: ``int4 sym g128``."""
    group = f"g{scheme.group_size}" if scheme.group_size else "per-channel"
    return f"int{scheme.bits} {'sym' if scheme.symmetric else 'asym'} {group}"


class _DequantizingLinear(nn.Module):
    """What the quantized linear layers share: the forward pass dequantizes the stored weight (the
    subclass's ``quantized``) in the input's dtype; activations stay in floating point."""

    bias: nn.Parameter | None

    def dequantized_weight(self) -> Tensor:
        return self.quantized.dequantize()

    def dense_weight(self) -> Tensor:
        """The ``[out, in]`` weight the layer computes with, what every weightkit layer offers (``weightkit
        export --dense`` writes it as a plain ``nn.Linear``'s)."""
        return self.dequantized_weight()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias)


class QuantizedLinear(_DequantizingLinear):
    """Drop-in replacement for ``nn.Linear`` holding int8 grid values, scales and zero points.

    Buffers: ``qweight`` (int8 ``[out, in]``), ``weight_scale`` (``[out, groups]``),
    ``weight_zero_point`` (int8 ``[out, groups]``, asymmetric grids only) and ``bias`` if any.
    The forward pass dequantizes the weight (weight-only quantization: activations stay in float).
    """

    def __init__(self, quantized: QuantizedWeight, bias: Tensor | None):
        super().__init__()
        self.scheme: QuantScheme = quantized.scheme
        self.out_features, self.in_features = quantized.qweight.shape
        self.register_buffer("qweight", quantized.qweight)
        self.register_buffer("weight_scale", quantized.scale)
        self.register_buffer("weight_zero_point", quantized.zero_point)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantized: QuantizedWeight) -> "QuantizedLinear":
        return cls(quantized, linear.bias)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.weight_scale, self.weight_zero_point, self.scheme)

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.qweight, self.weight_scale, self.weight_zero_point)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {_grid_text(self.scheme)}"


class FloatQuantizedLinear(_DequantizingLinear):
    """Drop-in replacement for ``nn.Linear`` holding its weight on an FP8 or FP4 grid.

    Buffers: ``qweight_bits`` (``uint8 [out, in]``, the bits of the grid values in the format's storage
    dtype, see :mod:`weightkit.quantized.float_grid`), ``weight_scale`` (``[out, groups]``: the model's
    float dtype for FP8, the bits of the E4M3 scales as ``uint8`` for NVFP4), ``weight_global_scale_bits``
    (NVFP4 only: the float32 global scale's bits as ``int32 [1]``) and ``bias`` if any. What belongs to
    the format is held as integer bits because ``Module.to(dtype)`` / ``.half()`` cast every
    floating-point tensor, float8 ones included, and would change the stored format; FP8 scales are the
    model's precision and follow such casts, as integer grids' scales do. The forward pass dequantizes
    the weight.
    """

    def __init__(self, quantized: FloatQuantizedWeight, bias: Tensor | None):
        super().__init__()
        self.scheme: FloatScheme = quantized.scheme
        self.out_features, self.in_features = quantized.qweight.shape
        nvfp4 = quantized.global_scale is not None
        self.register_buffer("qweight_bits", quantized.qweight.view(torch.uint8))
        self.register_buffer("weight_scale", quantized.scale.view(torch.uint8) if nvfp4 else quantized.scale)
        self.register_buffer(
            "weight_global_scale_bits", quantized.global_scale.view(torch.int32) if nvfp4 else None
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> FloatQuantizedWeight:
        qweight = self.qweight_bits.view(FORMATS[self.scheme.format].dtype)
        if self.weight_global_scale_bits is None:
            return FloatQuantizedWeight(qweight, self.weight_scale, None, self.scheme)
        scale = self.weight_scale.view(torch.float8_e4m3fn)
        global_scale = self.weight_global_scale_bits.view(torch.float32)
        return FloatQuantizedWeight(qweight, scale, global_scale, self.scheme)

    def extra_repr(self) -> str:
        s = self.scheme
        group = f"g{s.group_size}" if s.group_size else "per-channel"
        pow2 = f" pow2-{s.power_of_two}" if s.power_of_two else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {s.format} {group}{pow2}"


class VPTQLinear(_DequantizingLinear):
    """Drop-in replacement for ``nn.Linear`` holding a vector-quantized weight (VPTQ).

    Buffers: ``indices`` (int32 ``[out // v, in]``), ``codebook_bits`` (the float16 ``[k, v]`` codebook's
    bits as ``int16``), with a residual codebook ``residual_indices`` and ``residual_codebook_bits``, and
    ``bias`` if any. The codebooks are held as integer bits, as ``FloatQuantizedLinear`` holds its grid,
    because ``Module.to(dtype)`` casts every floating-point buffer and a bfloat16 cast would round them.
    The forward pass dequantizes the weight.
    """

    def __init__(self, quantized: VPTQWeight, bias: Tensor | None):
        super().__init__()
        groups, self.in_features = quantized.indices.shape
        self.out_features = groups * quantized.codebook.shape[1]
        residual = quantized.residual_codebook
        self.register_buffer("indices", quantized.indices)
        self.register_buffer("codebook_bits", quantized.codebook.view(torch.int16))
        self.register_buffer("residual_indices", quantized.residual_indices)
        self.register_buffer(
            "residual_codebook_bits", None if residual is None else residual.view(torch.int16)
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> VPTQWeight:
        bits = self.residual_codebook_bits
        residual = None if bits is None else bits.view(CODEBOOK_DTYPE)
        return VPTQWeight(
            self.indices, self.codebook_bits.view(CODEBOOK_DTYPE), self.residual_indices, residual
        )

    def extra_repr(self) -> str:
        spec = self.quantized.spec
        residual = f" + residual k={spec.residual_centroids}" if spec.residual_centroids else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"vptq v={spec.vector_length} k={spec.centroids}{residual}"
        )


class OutlierQuantizedLinear(_DequantizingLinear):
    """Drop-in replacement for ``nn.Linear`` holding an integer grid plus sparse 16-bit outliers (GWQ).

    Buffers: ``QuantizedLinear``'s (``qweight``, ``weight_scale``, ``weight_zero_point``) for the grid,
    ``outlier_index`` (int32 ``[k]``, row-major positions) and ``outlier_value_bits`` (the ``[k]`` float16,
    or bfloat16 for a bfloat16 model, outlier values' bits as ``int16``, so dtype casts of the model leave
    them exact), which replace the grid's values at those positions; ``bias`` if any. Not a subclass of
    ``QuantizedLinear``: code that reads a ``QuantizedLinear``'s grid alone would miss the outliers.
    """

    def __init__(self, quantized: SparseOutlierWeight, bias: Tensor | None):
        super().__init__()
        dense = quantized.dense
        self.scheme: QuantScheme = dense.scheme
        self.out_features, self.in_features = dense.qweight.shape
        self.outlier_dtype: torch.dtype = quantized.outlier_value.dtype
        self.register_buffer("qweight", dense.qweight)
        self.register_buffer("weight_scale", dense.scale)
        self.register_buffer("weight_zero_point", dense.zero_point)
        self.register_buffer("outlier_index", quantized.outlier_index)
        self.register_buffer("outlier_value_bits", quantized.outlier_value.view(torch.int16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> SparseOutlierWeight:
        dense = QuantizedWeight(self.qweight, self.weight_scale, self.weight_zero_point, self.scheme)
        return SparseOutlierWeight(
            dense, self.outlier_index, self.outlier_value_bits.view(self.outlier_dtype)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {_grid_text(self.scheme)}, "
            f"{len(self.outlier_index)} outliers"
        )


def quantized_layer(
    quantized: QuantizedWeight | FloatQuantizedWeight | VPTQWeight | SparseOutlierWeight, bias: Tensor | None
) -> nn.Module:
    """The layer holding ``quantized``: ``QuantizedLinear`` for an integer grid, ``FloatQuantizedLinear``
    for a float one, ``VPTQLinear`` for codebooks, ``OutlierQuantizedLinear`` for a grid with outliers."""
    layers = {
        QuantizedWeight: QuantizedLinear,
        FloatQuantizedWeight: FloatQuantizedLinear,
        VPTQWeight: VPTQLinear,
        SparseOutlierWeight: OutlierQuantizedLinear,
    }
    return layers[type(quantized)](quantized, bias)
