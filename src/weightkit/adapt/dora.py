"""DoRA: a LoRA whose update also learns each output row's magnitude (``LoRAConfig(dora=True)``).

Paper: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353. The adapted weight is
``W' = m * (W + s B A) / ||W + s B A||``, the norm taken per output feature (per row of the ``out x in``
weight), with a trainable magnitude vector ``m`` initialised to the row norms of ``W + s B A`` (so the
adapter starts as the base layer). As in the paper (Sec. 4.3) and PEFT, the norm is treated as a constant
in the backward pass, which saves memory and barely changes the gradient.

Several adapters active on one layer (LoRA and DoRA mixed) compute what PEFT's forward computes: a DoRA
adapter rescales the output of the base layer *and of the adapters before it* (:func:`merged_weight`),
and merging gives exactly those outputs.

These are the pure functions; :class:`weightkit.adapt.lora.LoRALinear` applies them to its adapters, and
the tensors save under PEFT's names (``lora_magnitude_vector``), so DoRA adapters load in PEFT unchanged.
"""

import torch
from torch import Tensor

__all__ = ["row_norms", "dora_extra_output", "dora_scale", "merged_weight", "unmerged_weight"]


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


def dora_scale(weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA's per-row factor ``m / ||W + delta||`` (``weight`` and ``delta`` are ``out x in``)."""
    return magnitude / row_norms(weight, delta)


def merged_weight(weight: Tensor, deltas: list[Tensor], scales: list[Tensor | None]) -> Tensor:
    """The one weight that computes the base layer and several adapters, in order, as the unmerged forward.

    Adapter ``i`` adds ``delta_i``; a DoRA adapter (per-row ``s_i`` from :func:`dora_scale`, taken against
    the base ``weight``; ``None`` for plain LoRA) then rescales everything before it as well, because its
    forward rescales the output accumulated so far (PEFT's does, with no dropout or in eval mode):
    ``W' = s_k (... s_1 (W + delta_1) ... + delta_k)``. One DoRA adapter alone gives the paper's
    ``m (W + delta) / ||W + delta||``.
    """
    merged = weight
    for delta, scale in zip(deltas, scales, strict=True):
        merged = merged + delta
        if scale is not None:
            merged = merged * scale[:, None]
    return merged


def unmerged_weight(merged: Tensor, deltas: list[Tensor], scales: list[Tensor | None]) -> Tensor:
    """Invert :func:`merged_weight` given the same deltas and scales (the base weight back)."""
    for delta, scale in reversed(list(zip(deltas, scales, strict=True))):
        if scale is not None:
            merged = merged / scale[:, None]
        merged = merged - delta
    return merged
