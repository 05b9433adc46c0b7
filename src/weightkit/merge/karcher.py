"""Karcher mean: the models' average direction on the unit sphere, scaled to their average norm.

The Karcher (Riemannian, Fréchet) mean of points on a sphere is the point minimising the sum of squared
great-circle distances to them. Merging with it is a mergekit (Arcee) method, ``karcher``; mergekit's
reference for it is Wang, Ye & Yin, "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold", arXiv
2603.04972, whose code is a mergekit commit. This module implements mergekit 0.1.5's ``karcher``, step for
step:

- Each model's tensor is one flattened vector ``v_i`` with norm ``n_i`` and direction ``u_i = v_i / n_i``
  (zero when ``n_i = 0``); only models with ``n_i > tol`` take part in the mean, with equal weights
  ``1 / k`` among those ``k``.
- Start from ``m = sum_i u_i / k`` normalised (from the first such ``u_i`` if ``|m| < tol``), then up to
  ``max_iter`` times: with ``theta_i = acos(<m, u_i>)`` (clamped to ``[-1, 1]``), the mean of the
  logarithm maps ``g = sum_{theta_i >= tol} (theta_i / sin theta_i) (u_i - <m, u_i> m) / k``; stop when
  ``|g| < tol``, else move along the great circle, ``m = cos|g| m + sin|g| g / |g|``, and renormalise.
- The result is ``m`` times ``sum_i n_i / N`` over all ``N`` models (so a model with a norm at most ``tol``
  still counts, with its tiny norm, in the scale); all norms at most ``tol`` give zeros.

mergekit averages every model it merges, **the base model included when a recipe names one** (it adds
the base to the models, after them, unless it is listed among them). weightkit does the same; when the base
is also listed among the models, mergekit keeps it at its listed place and weightkit puts it last, which
changes the order of the sums only (float32 rounding). Numerically, the norms and dot products here are
taken in double precision (:func:`weightkit.merge.gram.dot`) and the angles and coefficients computed in
double, where mergekit uses float32 throughout; a different rounding can, rarely, stop the iteration one
step earlier or later near ``tol``.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.gram import dot
from weightkit.registry import register

__all__ = ["karcher_mean", "KarcherConfig"]


def karcher_mean(tensors: list[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The Karcher mean of the tensors' directions, scaled to their mean norm (mergekit's ``karcher``).

    Args:
        tensors: the same tensor from each model, one shape; modified (each becomes its unit direction).
        max_iter: the most steps of the fixed-point iteration (0: the normalised Euclidean mean of the
            directions).
        tol: a model whose norm is at most this is left out of the direction; the iteration stops when the
            step is shorter than this; an angle below this counts as 0.

    Returns:
        A tensor of the inputs' shape and dtype (with one tensor, that tensor itself).

    Raises:
        WeightkitError: no tensors, or tensors of different shapes.
    """
    if not tensors:
        raise WeightkitError("karcher_mean needs at least one tensor")
    for i, tensor in enumerate(tensors):
        if tensor.shape != tensors[0].shape:
            raise WeightkitError(
                f"karcher_mean: tensor {i} has shape {tuple(tensor.shape)}, tensor 0 has "
                f"{tuple(tensors[0].shape)}"
            )
    if len(tensors) == 1:
        return tensors[0]
    norms = [math.sqrt(dot(t, t)) for t in tensors]
    scale = sum(norms) / len(tensors)
    units = [t.div_(n) for t, n in zip(tensors, norms, strict=True) if n > tol]
    if not units:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / len(units)
    mean = torch.zeros_like(units[0])
    for unit in units:
        mean.add_(unit, alpha=alpha)
    mean_norm = math.sqrt(dot(mean, mean))
    if mean_norm < tol:
        mean.copy_(units[0])
    else:
        mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for unit in units:
            cos = min(max(dot(mean, unit), -1.0), 1.0)
            theta = math.acos(cos)
            if theta < tol:
                continue
            coef = alpha * theta / math.sin(theta)
            tangent.add_(unit, alpha=coef).add_(mean, alpha=-coef * cos)
        step = math.sqrt(dot(tangent, tangent))
        if step < tol:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        norm = math.sqrt(dot(mean, mean))
        if norm > tol:
            mean.div_(norm)
    return mean.mul_(scale)


@dataclass
class KarcherConfig:
    """Karcher mean of the models, the base model included when one is given (``merge_method: karcher``).

    Attributes:
        max_iter: the most steps of the fixed-point iteration (default 10, mergekit's).
        tol: convergence tolerance on the step length, and the norm at or below which a model is left out of
            the direction (default 1e-5, mergekit's).
    """

    max_iter: int = 10
    tol: float = 1e-5

    per_tensor: ClassVar[tuple[str, ...]] = ()
    # mergekit averages the base model with the others when a recipe names one: see merge_tensor.
    base_optional: ClassVar[bool] = True
    model_count: ClassVar[tuple[int, int | None]] = (1, None)
    # A NaN/Inf tensor can drop out of the mean (its norm is not > tol), so the inputs are checked.
    propagates_non_finite: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise WeightkitError(f"karcher: max_iter must be an integer >= 0, got {self.max_iter!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float) or not self.tol >= 0:
            raise WeightkitError(f"karcher: tol must be a number >= 0, got {self.tol!r}")


def _karcher_merger(config: KarcherConfig, plan, model_params):
    def merge_tensor(inputs):
        # mergekit's order: the models as listed, then the base it adds to them.
        points = inputs.tensors + ([inputs.base] if inputs.base is not None else [])
        return karcher_mean(points, max_iter=config.max_iter, tol=float(config.tol))

    return merge_tensor


register("merge", "karcher", KarcherConfig, _karcher_merger)
