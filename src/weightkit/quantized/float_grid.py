"""Floating-point grids for weight-only quantization: FP8 (E4M3, E5M2) and FP4 (E2M1) with scales.

The method is ZeroQuant-FP ("ZeroQuant-FP: A Leap Forward in LLMs Post-Training W4A8 Quantization Using
Floating-Point Formats", Wu, Yao, He, arXiv:2307.09782) restricted to its weight side: each group of a
weight is divided by a scale ``absmax / format max`` and rounded to the nearest value of the format
(round half to even), and the scales may be constrained to powers of two so that a kernel can turn FP4
weights into FP8 by shifting exponents (the paper's two constraints, see :func:`power_of_two_scales`).

The formats (``FORMATS``):

- ``e4m3``: OCP/NVIDIA E4M3 "fn" (``torch.float8_e4m3fn``): no infinities, largest value 448;
- ``e5m2``: E5M2 (``torch.float8_e5m2``), largest finite value 57344;
- ``e2m1``: FP4 E2M1, the values ``±{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (torch has no dtype for it: grid
  values are held in ``float8_e4m3fn``, which represents every one of them exactly).

Values beyond the format's range saturate to ± its largest value (a weight never becomes inf or NaN).

FP4 is stored as NVFP4, the layout compressed-tensors exports and vLLM runs: groups of 16 columns whose
scales are themselves FP8 E4M3 numbers, times one float32 ``global_scale`` per tensor that maps the
largest group scale near the top of the E4M3 range (:func:`nvfp4_scales`). The dequantized weight is
``value * (scale / global_scale)`` computed as compressed-tensors computes it (module
:mod:`weightkit.quantized.compressed_tensors`), so an export dequantizes bit-identically there.

Deviations from the paper: the paper quantizes with GPTQ (and adds LoRC low-rank compensation); here the
rounding is round-to-nearest, calibration-free (GPTQ/LoRC on float grids are not done). The paper's FP4
scales are per row or per group; here FP4 is NVFP4 (groups of 16, E4M3 group scales, a global scale), the
only FP4 layout transformers and vLLM read. The paper designs its power-of-two constraints for FP4 weights
(the FP4 -> FP8 cast); NVFP4's scales are E4M3 numbers by format, so here the constraints are offered for
FP8 weights only (where they make the dequantization an exponent shift too) and refused for FP4.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from weightkit.errors import WeightkitError, require_finite
from weightkit.quantized.grid import check_grouped_shape

__all__ = [
    "FORMATS",
    "NVFP4_GROUP_SIZE",
    "FloatFormat",
    "FloatScheme",
    "FloatQuantizedWeight",
    "round_to_format",
    "absmax_scales",
    "power_of_two_scales",
    "nvfp4_scales",
    "float_quantize",
    "float_dequantize",
]

NVFP4_GROUP_SIZE = 16


@dataclass(frozen=True)
class FloatFormat:
    """A small floating-point format: its name, bits, largest finite value and torch storage dtype."""

    name: str
    bits: int
    max: float
    dtype: torch.dtype  # the dtype grid values are held in (exactly)


FORMATS = {
    "e4m3": FloatFormat("e4m3", 8, 448.0, torch.float8_e4m3fn),
    "e5m2": FloatFormat("e5m2", 8, 57344.0, torch.float8_e5m2),
    "e2m1": FloatFormat("e2m1", 4, 6.0, torch.float8_e4m3fn),
}


def _format(name: str) -> FloatFormat:
    if name not in FORMATS:
        raise WeightkitError(f"unknown float format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def _round_e2m1(x: Tensor) -> Tensor:
    """E2M1 round half to even on values already clamped to [-6, 6].

    The spacing of E2M1 is 0.5 below 2 (subnormals included), 1 in [2, 4) and 2 in [4, 6]; dividing by
    the spacing of the binade and rounding with ``torch.round`` (half to even) rounds to the nearest value
    with an even mantissa on ties, as IEEE does (e.g. 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4).
    """
    mag = x.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).to(x.dtype)
    return torch.copysign(torch.round(mag / step) * step, x)


def round_to_format(x: Tensor, fmt: str, *, name: str = "tensor") -> Tensor:
    """``x`` rounded to the nearest value of format ``fmt`` (ties to even), saturating at ± its max.

    Args:
        x: a float tensor.
        fmt: ``"e4m3"``, ``"e5m2"`` or ``"e2m1"``.
        name: named in the error.

    Returns:
        A tensor of ``x``'s shape in the format's storage dtype (``FORMATS[fmt].dtype``), holding only
        values of the format.

    Raises:
        WeightkitError: an unknown format, or NaN/Inf in ``x``.
    """
    spec = _format(fmt)
    require_finite(x, name)
    clamped = x.to(torch.float32).clamp(-spec.max, spec.max)
    if fmt == "e2m1":
        clamped = _round_e2m1(clamped)
    # torch's float8 casts round half to even (c10's fp8 conversions); for E2M1 the values are exact.
    return clamped.to(spec.dtype)


@dataclass(frozen=True)
class FloatScheme:
    """How one weight matrix is put on a floating-point grid.

    Attributes:
        format: ``"e4m3"`` or ``"e5m2"`` (FP8), ``"e2m1"`` (FP4).
        group_size: columns sharing one scale; ``None`` for one scale per output channel. NVFP4 (FP4
            as exported) needs 16.
        power_of_two: ``None`` (scales are ``absmax / max``), ``"m1"`` or ``"m2"``, the paper's two
            power-of-two constraints (:func:`power_of_two_scales`).
    """

    format: str = "e4m3"
    group_size: int | None = None
    power_of_two: str | None = None

    def __post_init__(self):
        _format(self.format)
        if self.group_size is not None and self.group_size < 1:
            raise WeightkitError(f"group_size must be a positive integer or None, got {self.group_size}")
        if self.power_of_two not in (None, "m1", "m2"):
            raise WeightkitError(f"power_of_two must be None, 'm1' or 'm2', got {self.power_of_two!r}")
        if self.power_of_two == "m2" and self.group_size is None:
            raise WeightkitError(
                "power_of_two 'm2' ties a row's group scales to its largest one: with one scale per output "
                "channel (group_size None) it changes nothing; give a group_size, or use 'm1'"
            )
        if self.format == "e2m1":
            if self.group_size != NVFP4_GROUP_SIZE:
                raise WeightkitError(
                    f"FP4 (e2m1) weights are stored as NVFP4, whose groups are {NVFP4_GROUP_SIZE} columns; "
                    f"group_size {self.group_size} is not supported"
                )
            if self.power_of_two is not None:
                raise WeightkitError(
                    "power-of-two scales are not supported for FP4: NVFP4 stores its group scales as FP8 "
                    "E4M3 numbers times a per-tensor global scale"
                )

    @property
    def bits(self) -> int:
        return FORMATS[self.format].bits

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse a weight this scheme cannot quantize, naming the tensor."""
        check_grouped_shape(shape, self.group_size, name)


@dataclass
class FloatQuantizedWeight:
    """A ``[out, in]`` weight on a float grid: grid values, per-group scales, NVFP4's global scale."""

    qweight: Tensor  # [out, in] in FORMATS[scheme.format].dtype
    scale: Tensor  # [out, groups]: the model's float dtype (FP8), float8_e4m3fn (NVFP4)
    global_scale: Tensor | None  # float32 [1] for NVFP4, else None
    scheme: FloatScheme

    def dequantize(self) -> Tensor:
        return float_dequantize(self.qweight, self.scale, self.global_scale)


def _grouped(w: Tensor, group_size: int | None) -> Tensor:
    return w.reshape(w.shape[0], -1, group_size or w.shape[1])


def absmax_scales(w: Tensor, fmt: str, group_size: int | None) -> Tensor:
    """``max|w| / format max`` per group, ``[out, groups]`` in float32 (at least float32's tiny)."""
    groups = _grouped(w.to(torch.promote_types(w.dtype, torch.float32)), group_size)
    return (groups.abs().amax(dim=-1) / _format(fmt).max).clamp_min(torch.finfo(torch.float32).tiny)


def power_of_two_scales(scale: Tensor, method: str) -> Tensor:
    """The paper's two scale constraints, M1 and M2, that make FP4 -> FP8 casting an exponent shift.

    - ``"m1"``: every scale becomes ``2^ceil(log2 s)``, a power of two;
    - ``"m2"``: the scales of a vector share its largest, ``s_max * 2^ceil(log2(s / s_max))``. The paper
      collects the scales into a vector without tying it to a layout here; weightkit takes the vector to
      be one output row's group scales, so the row keeps one real factor ``s_max`` (applicable per output
      channel after the matrix product) and its groups differ from it by powers of two (so
      :class:`FloatScheme` refuses M2 without groups, where it would change nothing).

    Both round the scale *up*, so the grid still covers every weight (none clips); the price is a
    coarser step, at most twice the unconstrained one.

    Args:
        scale: positive scales ``[out, groups]``.
        method: ``"m1"`` or ``"m2"``.
    """
    if method == "m1":
        return torch.exp2(torch.ceil(torch.log2(scale)))
    if method == "m2":
        row_max = scale.amax(dim=1, keepdim=True)
        return row_max * torch.exp2(torch.ceil(torch.log2(scale / row_max)))
    raise WeightkitError(f"power-of-two method must be 'm1' or 'm2', got {method!r}")


def nvfp4_scales(w: Tensor) -> tuple[Tensor, Tensor]:
    """NVFP4's two-level scales of ``w`` (``[out, in]``, ``in`` divisible by 16).

    The global scale is ``448 * 6 / max|w|`` (float32, shape ``[1]``): it maps the tensor's largest
    group scale to the top of the E4M3 range. Each group of 16 gets ``(max|group| / 6) * global_scale``
    rounded to E4M3; the effective scale of a group is ``scale / global_scale``. This is how
    compressed-tensors (``generate_gparam`` and its observers) computes them.

    Returns:
        ``(scale, global_scale)``: ``float8_e4m3fn [out, in // 16]`` and ``float32 [1]``.
    """
    absmax = w.detach().abs().amax().to(torch.float32)
    global_scale = (FORMATS["e4m3"].max * FORMATS["e2m1"].max / absmax).reshape(1)
    # An all-zero (or vanishingly small) tensor has no finite global scale: 1, as compressed-tensors does.
    global_scale = torch.where(torch.isfinite(global_scale), global_scale, 1.0)
    local = absmax_scales(w, "e2m1", NVFP4_GROUP_SIZE).to(torch.float32) * global_scale
    # A group whose scale rounds to 0 in E4M3 would divide by zero; its weights are below E2M1's reach at
    # any representable scale, so the smallest E4M3 number (2^-9) is as good and keeps them finite (0).
    scale = round_to_format(local, "e4m3", name="NVFP4 group scales").to(torch.float32)
    return torch.where(scale == 0, 2.0**-9, scale).to(torch.float8_e4m3fn), global_scale


def float_quantize(w: Tensor, scheme: FloatScheme, *, name: str = "weight") -> FloatQuantizedWeight:
    """Round-to-nearest of ``w`` (``[out, in]``) onto the float grid of ``scheme``.

    FP8: scales ``absmax / max`` per group (optionally power-of-two constrained) in ``w``'s dtype, and
    ``q = round(w / scale)`` in the format. FP4: NVFP4 scales (:func:`nvfp4_scales`) and
    ``q = round(w / (scale / global_scale))`` on E2M1.

    Raises:
        WeightkitError: ``w`` is not 2-D, the group size does not divide its columns, or it holds NaN/Inf
            (each naming ``name``).
    """
    scheme.check_shape(tuple(w.shape), name)
    require_finite(w, name)
    groups = _grouped(w.to(torch.promote_types(w.dtype, torch.float32)), scheme.group_size)
    if scheme.format == "e2m1":
        scale, global_scale = nvfp4_scales(w)
        effective = scale.to(torch.float32) / global_scale
    else:
        scale = absmax_scales(w, scheme.format, scheme.group_size)
        if scheme.power_of_two is not None:
            scale = power_of_two_scales(scale, scheme.power_of_two)
        # The stored scale (in the weight's dtype) is the one rounding and dequantizing use.
        scale = scale.to(w.dtype).clamp_min(torch.finfo(w.dtype).tiny)
        global_scale, effective = None, scale.to(groups.dtype)
    q = round_to_format(groups / effective.unsqueeze(-1), scheme.format, name=name)
    return FloatQuantizedWeight(q.reshape(w.shape), scale, global_scale, scheme)


def float_dequantize(qweight: Tensor, scale: Tensor, global_scale: Tensor | None) -> Tensor:
    """The weight a float grid stands for, exactly as compressed-tensors decompresses it.

    FP8: ``q.to(scale.dtype) * scale`` per group, in the scale's dtype. NVFP4: compressed-tensors unpacks
    to bfloat16 and computes ``q * (scale / global_scale)`` in float32, then rounds to bfloat16; so do we,
    so that a weight loaded by transformers equals ours bit for bit.
    """
    groups = _grouped(qweight, qweight.shape[1] // scale.shape[1])
    if global_scale is None:
        return (groups.to(scale.dtype) * scale.unsqueeze(-1)).reshape(qweight.shape)
    effective = scale.to(torch.bfloat16) / global_scale
    values = groups.to(torch.bfloat16).to(effective.dtype) * effective.unsqueeze(-1)
    return values.to(torch.bfloat16).reshape(qweight.shape)
