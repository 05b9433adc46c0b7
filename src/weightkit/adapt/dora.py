"""DoRA: a LoRA whose update also learns each output row's magnitude (``LoRAConfig(dora=True)``).

Paper: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353. The adapted weight is
``W' = m * (W + s B A) / ||W + s B A||``, the norm taken per output feature (per row of the ``out x in``
weight), with a trainable magnitude vector ``m`` initialised to the row norms of ``W + s B A`` (so the
adapter starts as the base layer). As in the paper (Sec. 4.3) and PEFT, the norm is treated as a constant
in the backward pass, which saves memory and barely changes the gradient.

These are the pure functions; :class:`weightkit.adapt.lora.LoRALinear` applies them to its adapters, and
the tensors save under PEFT's names (``lora_magnitude_vector``), so DoRA adapters load in PEFT unchanged.
"""

import torch
from torch import Tensor

__all__ = ["row_norms", "dora_extra_output", "dora_merged_weight", "dora_unmerged_weight"]


def row_norms(weight: Tensor, delta: Tensor) -> Tensor:
    """``||W + delta||`` per output feature (``weight`` and ``delta`` are ``out x in``)."""
    return torch.linalg.vector_norm(weight + delta, dim=1)


def dora_extra_output(
    base_out: Tensor, lora_out: Tensor, magnitude: Tensor, weight: Tensor, delta: Tensor
) -> Tensor:
    """What DoRA adds to the base layer's output (bias excluded from ``base_out``).

    ``y' = (m / n) * (x W^T + lora_out)`` where ``lora_out = s x A^T B^T`` and ``n = ||W + delta||``
    (detached); minus the base output ``x W^T`` the caller already has.
    """
    scale = magnitude / row_norms(weight, delta).detach()
    return (scale - 1) * base_out + scale * lora_out


def dora_merged_weight(weight: Tensor, delta: Tensor, magnitude: Tensor) -> tuple[Tensor, Tensor]:
    """The merged weight ``m * (W + delta) / ||W + delta||`` and the norms (kept to unmerge exactly)."""
    norms = row_norms(weight, delta)
    return (weight + delta) * (magnitude / norms)[:, None], norms


def dora_unmerged_weight(merged: Tensor, delta: Tensor, magnitude: Tensor, norms: Tensor) -> Tensor:
    """Invert :func:`dora_merged_weight` given the norms it returned."""
    return merged * (norms / magnitude)[:, None] - delta
