"""StableMax: a softmax whose cross-entropy keeps its gradients where softmax's vanish in floating point.

Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697.

Once a classifier fits its training data, softmax cross-entropy pushes the correct logit ever further
ahead; in float32 ``exp`` of the margin soon absorbs the other terms, the loss and its gradient round to
exactly zero ("softmax collapse") and learning stops. StableMax replaces ``exp`` by
``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` for ``x < 0`` (continuous, increasing, positive, linear
rather than exponential growth): ``StableMax(x)_i = s(x_i) / sum_j s(x_j)``. Computed in float64 as the
authors do. No deviation.
"""

import torch
from torch import Tensor

__all__ = ["stablemax", "stablemax_cross_entropy"]


def _s(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x + 1, 1 / (1 - torch.where(x >= 0, torch.zeros_like(x), x)))


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities along ``dim`` (float64)."""
    s = _s(logits.double())
    return s / s.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of StableMax over ``[..., classes]`` logits and integer ``targets``, skipping
    targets equal to ``ignore_index`` (a drop-in for ``F.cross_entropy`` on flattened logits); in the
    logits' dtype."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    kept = targets != ignore_index
    probabilities = stablemax(logits[kept])
    picked = probabilities.gather(1, targets[kept].unsqueeze(1)).squeeze(1)
    return (-picked.log().mean()).to(logits.dtype)
