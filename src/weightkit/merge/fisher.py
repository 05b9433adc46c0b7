"""Fisher merging: a per-entry weighted average where each model weighs by its diagonal Fisher information.

Paper: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832 (NeurIPS 2022).
Reference code: github.com/mmatena/model_merging (TensorFlow).

Each model's posterior is approximated (Laplace) by a Gaussian centred on its parameters ``theta_i`` with
the diagonal Fisher ``F_i`` as precision. Maximising the weighted joint log-posterior has the closed form,
entry by entry,

    theta*(j) = sum_i w_i F_i(j) theta_i(j) / sum_i w_i F_i(j)

with merging weights ``w_i >= 0``. As in the reference code, every Fisher is raised to a floor ``eps``
(default 1e-6) before use, so an entry where no model has any Fisher mass gets the plain weighted
average, and a model whose Fisher is ~0 on an entry contributes (almost) nothing there.

This module is the merge (``merge_method: fisher``). Estimating a model's Fisher is
:mod:`weightkit.merge.fisher_compute` (``weightkit fisher``); the file that carries it from one to the
other is :mod:`weightkit.merge.fisher_file`.

**Deliberate deviations from the reference code:**

- The floor is applied to every model's Fisher. The reference code's default
  (``favor_target_model=True``) floors only the first model's, so an entry where every Fisher is zero
  keeps the first model's value there instead of getting the weighted average.
- :func:`fisher_merge` does not rescale models by the norms of their Fishers. The reference code's
  default ``normalize_fishers=True`` divides each model's weight by the global L2 norm of its Fisher;
  callers who want that pass ``w_i / fisher_norm(F_i)`` as weights (:func:`fisher_norm`), and recipes
  set ``normalize_fishers: true``.
- ``eps = 0`` is allowed; entries whose weighted Fisher sum is then exactly 0 get the weighted average
  (the reference code would divide 0 by 0).
"""

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError, require_finite
from weightkit.merge.params import Spec, check_range
from weightkit.registry import register

__all__ = ["DEFAULT_EPS", "fisher_merge", "fisher_norm", "FisherConfig"]

# The reference code's fisher_floor.
DEFAULT_EPS = 1e-6


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise WeightkitError(f"fisher merge got {n} tensors but {len(weights)} weights")
    values = [float(w) for w in weights]
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise WeightkitError(f"fisher merge: weight {i} is {w}; weights must be finite and >= 0")
    if sum(values) <= 0:
        raise WeightkitError(f"fisher merge: the weights {values} sum to zero; at least one must be positive")
    return values


def fisher_merge(
    tensors: list[Tensor], fishers: list[Tensor], weights: list[float], *, eps: float = DEFAULT_EPS
) -> Tensor:
    """Merge one tensor of several models, each entry weighted by the models' Fisher information.

    ``out = sum_i w_i max(F_i, eps) t_i / sum_i w_i max(F_i, eps)``, entry by entry. Where every
    ``F_i <= eps`` this is the weighted average ``sum_i w_i t_i / sum_i w_i``; a model whose Fisher is
    far below the others' on an entry has (almost) no say there.

    Args:
        tensors: the same tensor (same shape) from each model; not modified.
        fishers: each model's diagonal Fisher for that tensor, same shape, finite and >= 0.
        weights: one merging weight per model, finite and >= 0, not all 0 (they need not sum to 1).
        eps: floor of every Fisher entry (absolute, in the Fishers' units); 0 disables it, and entries
            whose weighted Fisher sum is then 0 get the weighted average.

    Returns:
        A new tensor in the dtype of ``tensors[0]``, computed in at least float32.

    Raises:
        WeightkitError: no tensors, count or shape mismatches, negative or non-finite Fishers, bad
            weights or ``eps``.
    """
    n = len(tensors)
    if n == 0:
        raise WeightkitError("fisher merge needs at least one tensor")
    if len(fishers) != n:
        raise WeightkitError(f"fisher merge got {n} tensors but {len(fishers)} Fishers")
    values = _check_weights(weights, n)
    if not math.isfinite(eps) or eps < 0:
        raise WeightkitError(f"fisher merge: eps must be finite and >= 0, got {eps}")
    shape = tensors[0].shape
    for i, (tensor, fisher) in enumerate(zip(tensors, fishers, strict=True)):
        if tensor.shape != shape:
            raise WeightkitError(
                f"fisher merge: tensor {i} has shape {tuple(tensor.shape)}, tensor 0 has {tuple(shape)}"
            )
        if fisher.shape != shape:
            raise WeightkitError(
                f"fisher merge: Fisher {i} has shape {tuple(fisher.shape)}, its tensor has {tuple(shape)}"
            )
        require_finite(fisher, f"Fisher {i}")
        if fisher.numel() and float(fisher.min()) < 0:
            raise WeightkitError(f"fisher merge: Fisher {i} has negative entries; a Fisher is >= 0")

    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    # Two accumulators and one temporary per model instead of [n_models, ...] stacks: on a 32000x4096
    # embedding every full-size copy is 0.5 GB.
    numerator = torch.zeros(shape, dtype=dtype, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    for tensor, fisher, weight in zip(tensors, fishers, values, strict=True):
        if weight == 0:
            continue
        weighted = fisher.to(dtype).clamp_min(eps).mul_(weight)
        denominator.add_(weighted)
        numerator.addcmul_(weighted, tensor.to(dtype))
        del weighted
    empty = denominator == 0  # only possible with eps == 0
    if bool(empty.any()):
        average = torch.zeros_like(numerator)
        for tensor, weight in zip(tensors, values, strict=True):
            average.add_(tensor.to(dtype), alpha=weight)
        average.div_(sum(values))
        numerator = torch.where(empty, average, numerator)
        denominator.masked_fill_(empty, 1.0)
    return numerator.div_(denominator).to(tensors[0].dtype)


def fisher_norm(fisher: Mapping[str, Tensor] | str | os.PathLike) -> float:
    """Global L2 norm ``sqrt(sum over all tensors and entries of F^2)`` of one model's Fisher.

    The reference code divides each model's merging weight by this (``normalize_fishers``), so that a
    model whose Fisher is larger overall (more examples summed, a sharper loss) does not dominate.

    Args:
        fisher: a dict of Fisher tensors, or the path of a file written by :func:`save_fisher` (read one
            tensor at a time).

    Returns:
        The norm, accumulated in float64.
    """
    total = 0.0
    if isinstance(fisher, Mapping):
        for tensor in fisher.values():
            total += float(tensor.double().square().sum())
        return math.sqrt(total)
    from weightkit.checkpoint import CheckpointReader

    with CheckpointReader(fisher) as reader:
        for name in reader.names():
            total += float(reader.get(name).double().square().sum())
    return math.sqrt(total)


@dataclass
class FisherConfig:
    """Fisher merging (``merge_method: fisher``): each model gives a Fisher file from ``weightkit fisher``.

    ::

        models:
          - {model: ./ft-a, parameters: {fisher: ./ft-a.fisher.safetensors}}
          - {model: ./ft-b, parameters: {fisher: ./ft-b.fisher.safetensors, weight: 0.5}}
        merge_method: fisher

    Attributes:
        weight: each model's merging weight (>= 0; a model entry's ``weight`` overrides it).
        fisher: a default Fisher file (normally each model entry names its own).
        eps: floor of every Fisher entry (see :func:`fisher_merge`); entries where every model's Fisher
            is below it get the weighted average.
        normalize_fishers: divide each model's weight by the L2 norm of its whole Fisher, as the paper's
            reference code does by default, so models whose Fishers were estimated at different scales
            (other data, other lengths) count equally. Off by default: the paper's equation has no such
            factor.
    """

    weight: Spec = 1.0
    fisher: str | None = None
    eps: float = DEFAULT_EPS
    normalize_fishers: bool = False

    per_model: ClassVar[tuple[str, ...]] = ("weight", "fisher")
    files: ClassVar[tuple[str, ...]] = ("fisher",)
    needs_base: ClassVar[bool] = False
    model_count: ClassVar[tuple[int, int | None]] = (2, None)

    def __post_init__(self):
        check_range(self.weight, "fisher: weight", 0.0, math.inf)
        if not (isinstance(self.eps, int | float) and self.eps >= 0):
            raise WeightkitError(f"fisher: eps must be a number >= 0, got {self.eps!r}")


def _fisher_merger(config: FisherConfig, plan, model_params):
    norms = [fisher_norm(p["fisher"]) if config.normalize_fishers else 1.0 for p in model_params]

    def merge_tensor(inputs):
        weights = [p["weight"] / norm for p, norm in zip(inputs.params, norms, strict=True)]
        return fisher_merge(inputs.tensors, [p["fisher"] for p in inputs.params], weights, eps=config.eps)

    return merge_tensor


register("merge", "fisher", FisherConfig, _fisher_merger)
