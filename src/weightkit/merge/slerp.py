"""Spherical linear interpolation (SLERP) between two models' tensors.

Paper: Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985) introduced SLERP; it has no
arXiv id. Its use for merging language models follows mergekit (Goddard et al., "Arcee's MergeKit: A
Toolkit for Merging Large Language Models", arXiv 2403.13257), whose definition this module implements:

- the angle ``theta`` comes from the flattened tensors, each divided by its L2 norm (a tensor whose norm
  is at most ``eps`` is left as it is, so its dot product with the other is ~0);
- if ``|cos theta| > 0.9995`` the tensors are nearly colinear and ``sin theta`` is too small to divide
  by, so the result falls back to linear interpolation ``(1 - t) a + t b``;
- otherwise ``sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b``, applied to the
  un-normalised tensors (so norms interpolate along with the direction).

``t = 0`` gives ``a`` and ``t = 1`` gives ``b``. The only difference from mergekit is numerical: the
angle and the two coefficients are computed in Python double precision from the dot product (mergekit
uses float32 numpy scalars), and everything stays in torch on the tensors' device.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.gram import gram
from weightkit.merge.params import Spec, check_spec
from weightkit.registry import register

__all__ = ["slerp", "COLINEAR_THRESHOLD", "SlerpConfig"]

# mergekit's DOT_THRESHOLD: beyond it sin(theta) < 0.032 and the slerp coefficients lose precision.
COLINEAR_THRESHOLD = 0.9995


def slerp(a: Tensor, b: Tensor, t: float, *, eps: float = 1e-8, out: Tensor | None = None) -> Tensor:
    """Interpolate from ``a`` (``t = 0``) to ``b`` (``t = 1``) along the great circle between them.

    Args:
        a: the tensor at ``t = 0``; not modified.
        b: the tensor at ``t = 1``, same shape as ``a``; not modified.
        t: interpolation factor, usually in ``[0, 1]`` (values outside extrapolate).
        eps: a tensor whose L2 norm is at most this is not normalised before taking the angle.
        out: where to write the result (``a``'s shape); may be ``a`` itself, which saves allocating a
            tensor, but not ``b``.

    Returns:
        ``out``, or a new tensor of ``a``'s shape and dtype.

    Raises:
        WeightkitError: ``a`` and ``b`` have different shapes, or ``out`` is ``b``.
    """
    if a.shape != b.shape:
        raise WeightkitError(
            f"slerp needs tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if out is not None and b.numel() and out.data_ptr() == b.data_ptr():
        raise WeightkitError("slerp: out may be a but not b (b is read after out is written)")
    t = float(t)
    # The dot product of the normalised copies equals dot(a, b) / (|a| |b|); dividing once avoids
    # materialising two normalised copies of a possibly multi-GB tensor.
    products = gram([a, b]).tolist()
    norm_a, norm_b, dot = math.sqrt(products[0][0]), math.sqrt(products[1][1]), products[0][1]
    cos_theta = dot / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))

    if abs(cos_theta) > COLINEAR_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(cos_theta)
        sin_theta = math.sin(theta)
        coef_a = math.sin(theta - theta * t) / sin_theta
        coef_b = math.sin(theta * t) / sin_theta
    out = torch.mul(a, coef_a, out=out)
    return out.add_(b, alpha=coef_b)


@dataclass
class SlerpConfig:
    """SLERP from the base model (``t = 0``) to the one other model (``t = 1``) (``merge_method: slerp``).

    Attributes:
        t: interpolation factor; a number, a gradient over layers (``[0, 0.5, 1]``) or filter entries
            (``[{filter: self_attn, value: [0, 1]}, {value: 0.5}]``), as in mergekit recipes. Required, as
            in mergekit (which stops without it): a merge of two models halfway or not is the recipe's choice.
    """

    t: Spec | None = None  # None: not given, refused when the merge starts

    per_tensor: ClassVar[tuple[str, ...]] = ("t",)
    model_count: ClassVar[tuple[int, int | None]] = (1, 1)
    # A NaN/Inf in either input makes the angle NaN (its dot product or norm is NaN or infinite, and
    # inf / inf is NaN), hence every output entry: the engine checks only the result.
    propagates_non_finite: ClassVar[bool] = True

    def __post_init__(self):
        if self.t is not None:
            check_spec(self.t, "slerp: t")


def _slerp_merger(config: SlerpConfig, plan, model_params):
    # Checked here, when the merge starts, not in the config: a slices recipe may give t per slice only.
    if config.t is None:
        raise WeightkitError(
            "slerp needs t, the interpolation factor from the base (t: 0) to the other model (t: 1), e.g. "
            "parameters: {t: 0.5}; mergekit requires it too ('Missing required parameter t')"
        )

    def merge_tensor(inputs):
        return slerp(inputs.base, inputs.tensors[0], inputs.values["t"], out=inputs.base)

    return merge_tensor


register("merge", "slerp", SlerpConfig, _slerp_merger)
