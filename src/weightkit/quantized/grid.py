"""Integer grids for weight-only quantization: scales, zero points, rounding and dequantization.

Conventions (the same as compressed-tensors, so an export dequantizes bit-identically there):

- values live on the signed grid ``[-2^(b-1), 2^(b-1) - 1]`` stored as ``int8``;
- symmetric: ``scale = max|w| / ((2^b - 1) / 2)`` and no zero point;
- asymmetric: ``scale = (max - min) / (2^b - 1)`` over a range that always contains 0, and an
  integer zero point ``zp = q_min - round(min / scale)``;
- ``q = clamp(round(w / scale) + zp, q_min, q_max)`` and ``w_hat = (q - zp) * scale``;
- scales and zero points have shape ``[out, in // group_size]`` (per-channel: ``[out, 1]``).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = [
    "QuantScheme",
    "check_grouped_shape",
    "QuantizedWeight",
    "compute_qparams",
    "quantize_to_grid",
    "dequantize",
    "rtn_quantize",
]


def check_grouped_shape(shape: tuple[int, ...], group_size: int | None, name: str) -> None:
    """Refuse, naming the tensor, a weight that is not 2-D or whose input columns ``group_size`` does not
    divide (``None``: one group per row). Every grid with per-group scales (integer or float) needs both."""
    if len(shape) != 2:
        raise WeightkitError(f"{name}: only 2-D weights can be quantized, got shape {tuple(shape)}")
    if group_size is not None and shape[1] % group_size:
        raise WeightkitError(
            f"{name}: group size {group_size} does not divide its {shape[1]} input columns "
            f"(shape {tuple(shape)}); choose a group size that divides {shape[1]}"
        )


@dataclass(frozen=True)
class QuantScheme:
    """How one weight matrix is quantized.

    Attributes:
        bits: bits per weight, 2 to 8.
        group_size: columns sharing one scale (32, 64, 128 ...); ``None`` means one scale per output
            channel (per row).
        symmetric: a grid centred on zero (no zero point) if True; otherwise an affine grid with an
            integer zero point, which fits skewed rows better at the same bits.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise WeightkitError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise WeightkitError(f"group_size must be a positive integer or None, got {self.group_size}")

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse a weight this scheme cannot quantize, naming the tensor."""
        check_grouped_shape(shape, self.group_size, name)


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight: grid values, per-group scales and optional zero points."""

    qweight: Tensor  # int8 [out, in], values on the signed grid
    scale: Tensor  # [out, groups], dtype of the dequantized weight
    zero_point: Tensor | None  # int8 [out, groups]; None for symmetric grids
    scheme: QuantScheme

    def dequantize(self) -> Tensor:
        return dequantize(self.qweight, self.scale, self.zero_point)

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Cut into consecutive row blocks (undoes quantizing several weights stacked by rows)."""
        zeros = [None] * len(sizes) if self.zero_point is None else self.zero_point.split(sizes)
        return [
            QuantizedWeight(q, s, z, self.scheme)
            for q, s, z in zip(self.qweight.split(sizes), self.scale.split(sizes), zeros, strict=True)
        ]


def _grouped(w: Tensor, group_size: int | None) -> Tensor:
    """``[out, in] -> [out, groups, group]`` view (per-channel: one group of all columns)."""
    return w.reshape(w.shape[0], -1, group_size or w.shape[1])


def _checked_clip_ratio(
    clip_ratio: Tensor | float, groups_shape: tuple[int, int], dtype: torch.dtype, device, name: str
) -> Tensor:
    """``clip_ratio`` as a tensor, refused unless it is one ratio or one per output row and group, each in
    ``(0, 1]``."""
    ratio = torch.as_tensor(clip_ratio, dtype=dtype, device=device)
    if ratio.dim() and tuple(ratio.shape) != groups_shape:
        raise WeightkitError(
            f"{name}: clip ratio has shape {tuple(ratio.shape)}, expected {groups_shape} "
            f"(one ratio per output row and group)"
        )
    if not bool(((ratio > 0) & (ratio <= 1)).all()):
        raise WeightkitError(f"{name}: clip ratios must lie in (0, 1]")
    return ratio


def compute_qparams(
    w: Tensor, scheme: QuantScheme, *, clip_ratio: Tensor | float | None = None, name: str = "weight"
) -> tuple[Tensor, Tensor | None]:
    """Min/max scales (and zero points) for each group of ``w`` (``[out, in]``), in ``w``'s dtype.

    Args:
        w: the weight, ``[out, in]``.
        scheme: bits, group size and grid symmetry.
        clip_ratio: optional range shrink per group, ``[out, groups]`` (or one float for all), each in
            ``(0, 1]``: a symmetric grid covers ``ratio * max|w|``, an asymmetric one
            ``[ratio * min, ratio * max]``. Weights outside the shrunk range clamp to the grid's ends;
            giving up a few outliers buys a finer step for everything else (AWQ's clipping search,
            :func:`weightkit.compress.quant.awq.awq_search_clip`, picks the ratios).
        name: the tensor's name, used in error messages.

    Returns:
        ``(scale, zero_point)``: scale ``[out, groups]`` in ``w``'s dtype; zero point ``int8``
        ``[out, groups]``, or ``None`` for a symmetric grid.

    Raises:
        WeightkitError: ``w`` is not 2-D, the group size does not divide its columns, or a clip ratio
            is out of range or of the wrong shape.
    """
    scheme.check_shape(tuple(w.shape), name)
    # Never compute in less than float32, but keep float64 inputs in float64.
    groups = _grouped(w.to(torch.promote_types(w.dtype, torch.float32)), scheme.group_size)
    if clip_ratio is not None:
        ratio = _checked_clip_ratio(clip_ratio, tuple(groups.shape[:2]), groups.dtype, w.device, name)
    levels = 2**scheme.bits - 1
    tiny = torch.finfo(w.dtype).tiny
    if scheme.symmetric:
        absmax = groups.abs().amax(dim=-1)
        if clip_ratio is not None:
            absmax = absmax * ratio
        scale = absmax / (levels / 2)
        return scale.clamp_min(tiny).to(w.dtype), None
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    if clip_ratio is not None:
        lo, hi = lo * ratio, hi * ratio
    scale = ((hi - lo) / levels).clamp_min(tiny)
    zero_point = (scheme.q_min - torch.round(lo / scale)).clamp(scheme.q_min, scheme.q_max)
    return scale.to(w.dtype), zero_point.to(torch.int8)


def quantize_to_grid(w: Tensor, scale: Tensor, zero_point: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Grid values (``int8``, same shape as ``w``) of ``w`` under the given scales/zero points."""
    groups = _grouped(w, w.shape[1] // scale.shape[1])
    q = (groups / scale.unsqueeze(-1)).round_()  # in place: one float copy of w, not three
    if zero_point is not None:
        q.add_(zero_point.unsqueeze(-1).to(q.dtype))
    return q.clamp_(scheme.q_min, scheme.q_max).to(torch.int8).reshape(w.shape)


def dequantize(qweight: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """``(q - zp) * scale`` per group, in ``scale``'s dtype."""
    groups = _grouped(qweight, qweight.shape[1] // scale.shape[1]).to(scale.dtype)
    if zero_point is not None:
        groups = groups - zero_point.unsqueeze(-1).to(scale.dtype)
    return (groups * scale.unsqueeze(-1)).reshape(qweight.shape)


def rtn_quantize(
    w: Tensor, scheme: QuantScheme, *, clip_ratio: Tensor | float | None = None, name: str = "weight"
) -> QuantizedWeight:
    """Round-to-nearest: min/max grid per group (optionally clipped), every weight rounded independently.

    Rows are rounded a block at a time (their grids are independent), so the float32 temporaries stay at
    a few MB whatever the weight's size (a 7B model's 4096x11008 MLP matrix would otherwise need three
    180 MB float32 copies of itself beside it); the blocks also run about twice as fast as one pass on CPU.
    """
    scheme.check_shape(tuple(w.shape), name)
    rows = max(1, _RTN_BLOCK_VALUES // max(w.shape[1], 1))
    if w.shape[0] <= rows:
        scale, zero_point = compute_qparams(w, scheme, clip_ratio=clip_ratio, name=name)
        return QuantizedWeight(quantize_to_grid(w, scale, zero_point, scheme), scale, zero_point, scheme)
    ratios = [clip_ratio] * -(-w.shape[0] // rows)
    if clip_ratio is not None:  # checked whole (so a refusal names the whole shape), then cut with the rows
        groups_shape = (w.shape[0], w.shape[1] // (scheme.group_size or w.shape[1]))
        dtype = torch.promote_types(w.dtype, torch.float32)
        if _checked_clip_ratio(clip_ratio, groups_shape, dtype, w.device, name).dim():
            ratios = list(clip_ratio.split(rows))
    blocks = [
        rtn_quantize(block, scheme, clip_ratio=block_ratio, name=name)
        for block, block_ratio in zip(w.split(rows), ratios, strict=True)
    ]
    zero_point = None if scheme.symmetric else torch.cat([b.zero_point for b in blocks])
    return QuantizedWeight(
        torch.cat([b.qweight for b in blocks]), torch.cat([b.scale for b in blocks]), zero_point, scheme
    )


# Values rounded at a time by rtn_quantize: 4 MB of float32.
_RTN_BLOCK_VALUES = 2**20
