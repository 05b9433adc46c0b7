"""Model Stock: interpolate between the base and the average of a few fine-tuned models.

Paper: Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", arXiv 2403.19522.

With ``k >= 2`` fine-tuned tensors ``t_i`` of one base tensor ``b`` and deltas ``d_i = t_i - b``, the
angle between fine-tuned models is estimated by the mean pairwise cosine similarity
``cos = mean_{i<j} <d_i, d_j> / (|d_i| |d_j|)`` of the flattened deltas (each pair's cosine clamped to
``[-1, 1]``, its norm product to at least ``eps``). The paper's interpolation ratio is
``t = k cos / (1 + (k - 1) cos)`` and the result ``t * mean_i(t_i) + (1 - t) * b``.

This is mergekit's ``model_stock`` with its default ``filter_wise: false``: every tensor, 1-D ones
included, is flattened and gets one ratio (mergekit's ``filter_wise: true`` mode, one ratio per row, is
not offered here). Differences from mergekit:

- A mean cosine below 0 is raised to 0, so ``t`` stays in ``[0, 1]`` and opposed deltas give the base.
  The paper's formula assumes fine-tuned models at a positive angle; mergekit applies it as is, which
  for ``cos < 0`` extrapolates away from the fine-tuned average (``t < 0``) and at
  ``cos = -1 / (k - 1)`` divides by zero (Inf/NaN weights).
- The norm product is clamped at ``eps`` (default 1e-8) where mergekit uses 1e-6; the two differ only
  for deltas with norms around 1e-3 or smaller.
- Dot products are accumulated in double precision (mergekit: float32), which changes ``t`` only at the
  level of float32 rounding.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.gram import gram
from weightkit.registry import register

__all__ = ["model_stock", "ModelStockConfig"]


def model_stock(base: Tensor, tensors: list[Tensor], *, eps: float = 1e-8) -> Tensor:
    """Merge ``k >= 2`` fine-tuned tensors of one base tensor with Model Stock's interpolation ratio.

    Args:
        base: the base (pre-trained) model's tensor; not modified.
        tensors: the same tensor from each fine-tuned model, each of ``base``'s shape; not modified.
        eps: lower bound on the product of two delta norms when taking their cosine, so a zero delta
            gives a cosine of 0 instead of NaN.

    Returns:
        A new tensor ``t * mean(tensors) + (1 - t) * base`` of ``base``'s shape and dtype, with
        ``t`` as described in the module docstring.

    Raises:
        WeightkitError: fewer than two fine-tuned tensors, or a shape mismatch.
    """
    if len(tensors) < 2:
        raise WeightkitError(
            f"model_stock needs at least 2 fine-tuned models besides the base, got {len(tensors)}"
        )
    for i, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise WeightkitError(
                f"model_stock: fine-tuned tensor {i} has shape {tuple(tensor.shape)}, the base has "
                f"{tuple(base.shape)}"
            )
    ratio = _stock_ratio(base, tensors, eps=eps)
    # Same order of operations as mergekit: average the fine-tuned tensors, then interpolate.
    out = tensors[0].clone()
    for tensor in tensors[1:]:
        out.add_(tensor)
    out.div_(len(tensors))
    return out.mul_(ratio).add_(base, alpha=1.0 - ratio)


def _stock_ratio(base: Tensor, tensors: list[Tensor], *, eps: float = 1e-8) -> float:
    """Model Stock's interpolation ratio ``t = k cos / (1 + (k - 1) cos)`` with ``cos`` clamped to [0, 1].

    Args:
        base: the base model's tensor.
        tensors: ``k >= 2`` fine-tuned tensors of ``base``'s shape.
        eps: lower bound on each product of delta norms.

    Returns:
        ``t`` in ``[0, 1]``: 0 when the deltas are orthogonal or opposed, 1 when they point the same way.
    """
    k = len(tensors)
    products = gram(tensors, center=base)
    norms = products.diagonal().sqrt()
    cosines = (products / (norms[:, None] * norms[None, :]).clamp(min=eps)).clamp(-1.0, 1.0)
    pairs = torch.triu_indices(k, k, offset=1, device=products.device)
    cos_theta = min(max(float(cosines[pairs[0], pairs[1]].mean()), 0.0), 1.0)
    return k * cos_theta / (1 + (k - 1) * cos_theta)


@dataclass
class ModelStockConfig:
    """Model Stock over a base and two or more fine-tuned models (``merge_method: model_stock``).

    The interpolation ratio of each tensor comes from the angle between the fine-tuned models' task
    vectors.

    Attributes:
        filter_wise: mergekit's option: ``False`` (its default, and what this computes) gives one ratio
            per tensor; ``True`` (one ratio per row) is not implemented and is refused.
    """

    filter_wise: bool = False

    model_count: ClassVar[tuple[int, int | None]] = (2, None)

    def __post_init__(self):
        if self.filter_wise is not False:
            raise WeightkitError(
                f"model_stock: filter_wise={self.filter_wise!r} is not implemented: weightkit computes one "
                "ratio per tensor (mergekit's default, filter_wise: false)"
            )


def _model_stock_merger(config: ModelStockConfig, plan, model_params):
    def merge_tensor(inputs):
        return model_stock(inputs.base, inputs.tensors)

    return merge_tensor


register("merge", "model_stock", ModelStockConfig, _model_stock_merger)
