"""Arcee Fusion: take the other model's value only where it changed the most, as measured by an importance.

Arcee Fusion is mergekit's own method (Arcee; mergekit's reference is https://arcee.ai); there is no paper
and no arXiv id. This module implements mergekit 0.1.5's ``arcee_fusion`` for the base model's tensor
``a`` and the other model's ``b``:

- importance ``I = |b - a| * KL(softmax(b) || softmax(a))``, where the softmaxes and the KL divergence run
  along the last dimension (one KL value per row of a matrix; a 1-D tensor is one row) and each softmax has
  1e-8 added before the divergence ``sum p log(p / q)`` is taken;
- threshold ``median(I) + 1.5 (q3(I) - q1(I))`` (a Tukey fence), each quantile the value at position
  ``int(q (n - 1))`` of the sorted ``I``;
- the result is ``b`` where ``I >= threshold`` and ``a`` elsewhere (``a + (b - a)`` and ``a + 0``, as in
  mergekit, so the float32 values are mergekit's).

One deliberate difference: for a tensor of more than 1,000,000 entries, mergekit estimates the quantiles
from 1,000,000 entries drawn at random (with replacement, from torch's global generator, which its
``--random-seed`` seeds); weightkit takes the exact quantiles of every entry, which is what that sample
estimates, so the method has no randomness. On such tensors the threshold, and so the few entries near it,
can differ from a mergekit run; on tensors of at most 1,000,000 entries the outputs are the same.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.registry import register

__all__ = ["arcee_fusion", "fusion_importance", "fusion_threshold", "ArceeFusionConfig"]

# mergekit's smoothing of both softmaxes before the KL divergence.
_SMOOTHING = 1e-8


def fusion_importance(a: Tensor, b: Tensor) -> Tensor:
    """``|b - a|`` times ``KL(softmax(b) || softmax(a))`` along the last dimension (each softmax + 1e-8).

    Args:
        a: the base model's tensor; not modified.
        b: the other model's tensor, same shape; not modified.

    Returns:
        A new tensor of ``a``'s shape.
    """
    p = F.softmax(b, dim=-1).add_(_SMOOTHING)
    q = F.softmax(a, dim=-1).add_(_SMOOTHING)
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return torch.sub(b, a).abs_().mul_(divergence)


def fusion_threshold(values: Tensor) -> Tensor:
    """The Tukey fence ``median + 1.5 (q3 - q1)`` of ``values``, each quantile the value at sorted position
    ``int(q (n - 1))`` of all ``n`` entries (a 0-dimensional tensor of ``values``' dtype)."""
    flat = values.reshape(-1)
    # kthvalue counts from 1; torch.quantile would interpolate (and refuses over 16M entries).
    q1, median, q3 = (torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(a: Tensor, b: Tensor) -> Tensor:
    """``b`` where its importance (:func:`fusion_importance`) reaches :func:`fusion_threshold`, else ``a``.

    Args:
        a: the base model's tensor; not modified.
        b: the other model's tensor, same shape; not modified.

    Returns:
        A new tensor of ``a``'s shape and dtype.

    Raises:
        WeightkitError: ``a`` and ``b`` have different shapes or are empty.
    """
    if a.shape != b.shape:
        raise WeightkitError(
            f"arcee_fusion needs tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.numel() == 0:
        raise WeightkitError("arcee_fusion: an empty tensor has no quantiles")
    importance = fusion_importance(a, b)
    chosen = importance >= fusion_threshold(importance)
    del importance
    delta = torch.sub(b, a).mul_(chosen)
    return delta.add_(a)


@dataclass
class ArceeFusionConfig:
    """Arcee Fusion of the base model and one other model (``merge_method: arcee_fusion``); no options."""

    per_tensor: ClassVar[tuple[str, ...]] = ()
    model_count: ClassVar[tuple[int, int | None]] = (1, 1)
    # Where the importance is NaN the comparison is false and the base's entry is kept: inputs are checked.
    propagates_non_finite: ClassVar[bool] = False
    # A selection (three order statistics) per tensor: worth a GPU, as TIES's trim is (see merge()).
    computes_on_device: ClassVar[bool] = True


def _arcee_fusion_merger(config: ArceeFusionConfig, plan, model_params):
    def merge_tensor(inputs):
        return arcee_fusion(inputs.base, inputs.tensors[0])

    return merge_tensor


register("merge", "arcee_fusion", ArceeFusionConfig, _arcee_fusion_merger)
