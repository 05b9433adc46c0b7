"""Multi-SLERP: a weighted spherical average of several models (or of their task vectors).

Multi-SLERP is mergekit's (Arcee's) own method; mergekit's reference for it is a blog post,
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea, and there is no paper and no arXiv id. This
module implements mergekit 0.1.5's ``multislerp``.

For each tensor, with ``v_i`` each model's tensor flattened (minus the base model's when there is one) and
weights ``w_i`` (divided by their sum when ``normalize_weights``):

1. ``u_i = v_i / (|v_i| + eps)``: the points on the unit sphere;
2. ``m = sum_i w_i u_i``, and its direction ``m / |m|``;
3. the result is ``m / |m|`` scaled to the weighted mean norm ``sum_i w_i |v_i|`` (plus the base).

mergekit words step 3 as a barycentric interpolation: project the ``u_i`` onto the tangent space at
``m / |m|``, average them there, and map the average back with the exponential map. That average is
``sum_i w_i (u_i - <u_i, m/|m|> m/|m|) = m - |m| m/|m| = 0`` for any weights, so the map returns
``m / |m|`` itself; mergekit computes the zero vector in float32 and adds its rounding noise (~1e-7
relative), which is the only difference from this module's output. The norms are taken in double
precision (:func:`weightkit.merge.gram.gram`), mergekit's in float32.

With one model the result is that model. When ``|m| < eps`` (opposite points whose weights cancel) two
models fall back to the weighted sum ``w_1 v_1 + w_2 v_2`` (plus the base), as in mergekit; with more
models mergekit stops with an error, and so does weightkit, naming the tensor, except in one case: when
every ``v_i`` is zero (a tensor no model changed from the base), the result is the base's tensor, where
mergekit stops. Weights summing to zero with ``normalize_weights`` are refused (mergekit divides by zero).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.gram import gram
from weightkit.merge.params import Spec, check_bool, check_spec
from weightkit.registry import register

__all__ = ["multislerp", "MultiSlerpConfig"]

# A weight sum this small relative to the weights is a cancellation, not a scale (see weightkit.merge.linear).
_ZERO_SUM_RTOL = 1e-8


def multislerp(
    tensors: list[Tensor],
    weights: list[float],
    *,
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    name: str = "tensor",
) -> Tensor:
    """Weighted spherical average of ``tensors`` (of their differences from ``base``, when given).

    Args:
        tensors: the same tensor from each model, one shape; modified (each becomes its difference from
            ``base``; the first may become the result).
        weights: one weight per tensor.
        base: the base model's tensor, or None to average the tensors themselves; not modified.
        normalize_weights: divide the weights by their sum.
        eps: added to each norm before dividing by it; a mean direction shorter than this is degenerate.
        name: the tensor's name, for error messages.

    Returns:
        A tensor of the inputs' shape and dtype (with one tensor, that tensor itself).

    Raises:
        WeightkitError: no tensors, a count or shape mismatch, weights summing to zero with
            ``normalize_weights``, or more than two models whose weighted points cancel out.
    """
    if not tensors:
        raise WeightkitError("multislerp needs at least one tensor")
    if len(weights) != len(tensors):
        raise WeightkitError(f"multislerp got {len(tensors)} tensors but {len(weights)} weights")
    for i, tensor in enumerate(tensors):
        if tensor.shape != tensors[0].shape or (base is not None and tensor.shape != base.shape):
            raise WeightkitError(
                f"multislerp: tensor {i} has shape {tuple(tensor.shape)}, tensor 0 has "
                f"{tuple(tensors[0].shape)}"
                + (f" and the base {tuple(base.shape)}" if base is not None else "")
            )
    if len(tensors) == 1:
        return tensors[0]
    weights = [float(w) for w in weights]
    if normalize_weights:
        total = sum(weights)
        if abs(total) <= _ZERO_SUM_RTOL * sum(abs(w) for w in weights):
            raise WeightkitError(
                f"multislerp with normalize_weights: the weights {weights} sum to zero; change them or set "
                "normalize_weights to false"
            )
        weights = [w / total for w in weights]
    if base is not None:
        for tensor in tensors:
            tensor.sub_(base)
    norms = [math.sqrt(v) for v in gram(tensors).diagonal().tolist()]
    mean = torch.zeros_like(tensors[0])
    for tensor, weight, norm in zip(tensors, weights, norms, strict=True):
        mean.add_(tensor, alpha=weight / (norm + eps))  # the point on the unit sphere, weighted
    mean_norm = math.sqrt(float(gram([mean])[0, 0]))
    if mean_norm < eps:
        return _degenerate(tensors, weights, norms, base, name)
    scale = sum(w * n for w, n in zip(weights, norms, strict=True))
    out = mean.mul_(scale / mean_norm)
    return out.add_(base) if base is not None else out


def _degenerate(tensors, weights, norms, base, name) -> Tensor:
    """The weighted unit points cancel out: mergekit's fallbacks (``tensors`` hold the ``v_i``)."""
    if len(tensors) == 2 or all(norm == 0 for norm in norms):
        # Two models: mergekit's weighted sum of the v_i. All v_i zero: that sum is zero too (the base).
        out = tensors[0].mul_(weights[0])
        for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
            out.add_(tensor, alpha=weight)
        return out.add_(base) if base is not None else out
    raise WeightkitError(
        f"multislerp: at {name} the weighted directions of the {len(tensors)} models cancel out (opposite "
        "task vectors with weights that balance), so there is no mean direction; change the weights"
    )


@dataclass
class MultiSlerpConfig:
    """Multi-SLERP of two or more models, with or without a base model (``merge_method: multislerp``).

    Attributes:
        weight: each model's weight (a model entry's ``weight`` overrides it); a number, a gradient over
            layers or filter entries. mergekit requires one per model; the default here is 1.0.
        normalize_weights: divide the weights by their sum (default true).
        eps: added to each norm before dividing by it (default 1e-8, mergekit's).
    """

    weight: Spec = 1.0
    normalize_weights: bool = True
    eps: float = 1e-8

    per_model: ClassVar[tuple[str, ...]] = ("weight",)
    per_tensor: ClassVar[tuple[str, ...]] = ()
    base_optional: ClassVar[bool] = True
    model_count: ClassVar[tuple[int, int | None]] = (1, None)
    propagates_non_finite: ClassVar[bool] = False

    def __post_init__(self):
        check_spec(self.weight, "multislerp: weight")
        check_bool(self.normalize_weights, "multislerp: normalize_weights")
        if isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or not self.eps >= 0:
            raise WeightkitError(f"multislerp: eps must be a number >= 0, got {self.eps!r}")


def _multislerp_merger(config: MultiSlerpConfig, plan, model_params):
    def merge_tensor(inputs):
        return multislerp(
            inputs.tensors,
            [p["weight"] for p in inputs.params],
            base=inputs.base,
            normalize_weights=config.normalize_weights,
            eps=float(config.eps),
            name=inputs.name,
        )

    return merge_tensor


register("merge", "multislerp", MultiSlerpConfig, _multislerp_merger)
