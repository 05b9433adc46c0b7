"""Weighted average of whole models: the model soup.

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", arXiv 2203.05482.

``linear(tensors, weights) = sum_i w_i t_i / sum_i w_i`` (the division only when ``normalize``), the
definition of mergekit's ``linear`` method. The one difference: mergekit divides by a zero weight sum
and writes Inf/NaN weights; here that is refused with a clear error.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.params import Spec, check_spec
from weightkit.registry import register

__all__ = ["linear", "LinearConfig"]

# A weight sum this small relative to the weights themselves is a cancellation ([0.1, 0.2, -0.3]), not a
# scale: dividing by it would blow the merged tensor up by ~1e16.
_ZERO_SUM_RTOL = 1e-8


def linear(
    tensors: list[Tensor], weights: list[float], *, normalize: bool = True, out: Tensor | None = None
) -> Tensor:
    """Weighted sum of same-shaped tensors, optionally divided by the sum of the weights.

    Args:
        tensors: the same tensor (same shape) from each model; not modified (except ``tensors[0]`` when
            it is ``out``).
        weights: one weight per tensor; negative weights are allowed.
        normalize: divide by ``sum(weights)`` so that the weights need not sum to 1.
        out: where to write the result (same shape); may be ``tensors[0]`` itself, which saves
            allocating a tensor, but no other input.

    Returns:
        ``sum_i w_i t_i`` (``/ sum_i w_i`` when ``normalize``), in the inputs' dtype: a new tensor, or
        ``out``.

    Raises:
        WeightkitError: no tensors, a tensor/weight count or shape mismatch, ``normalize`` with
            weights summing to zero, or an ``out`` of another shape or that is ``tensors[i]``, ``i > 0``.
    """
    if not tensors:
        raise WeightkitError("linear merge needs at least one tensor")
    if len(weights) != len(tensors):
        raise WeightkitError(f"linear merge got {len(tensors)} tensors but {len(weights)} weights")
    shape = tensors[0].shape
    for i, tensor in enumerate(tensors):
        if tensor.shape != shape:
            raise WeightkitError(
                f"linear merge: tensor {i} has shape {tuple(tensor.shape)}, tensor 0 has {tuple(shape)}"
            )
    total = float(sum(weights))
    if normalize and abs(total) <= _ZERO_SUM_RTOL * sum(abs(float(w)) for w in weights):
        raise WeightkitError(
            f"linear merge with normalize=True: the weights {list(weights)} sum to zero, so the "
            "weighted average is undefined; change the weights or set normalize to false"
        )
    if out is not None:
        if out.shape != shape:
            raise WeightkitError(
                f"linear merge: out has shape {tuple(out.shape)}, the tensors {tuple(shape)}"
            )
        if any(out.data_ptr() == t.data_ptr() and t.numel() for t in tensors[1:]):
            raise WeightkitError("linear merge: out may be tensors[0] but no other input (it is read later)")
    # One output buffer accumulated in place: a stacked [n_models, ...] copy would cost n_models
    # extra tensors on a 32000x4096 embedding.
    out = (
        torch.mul(tensors[0], float(weights[0]), out=out)
        if out is not None
        else tensors[0] * float(weights[0])
    )
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=float(weight))
    if normalize:
        out.div_(total)
    return out


@dataclass
class LinearConfig:
    """Weighted average of the models (``merge_method: linear``); no base model.

    Attributes:
        weight: default weight of each model (a model entry's ``weight`` overrides it); a number, a
            gradient over layers or filter entries (see :mod:`weightkit.merge.params`).
        normalize: divide by the sum of the weights, so weights need not sum to 1.
    """

    weight: Spec = 1.0
    normalize: bool = True

    per_model: ClassVar[tuple[str, ...]] = ("weight",)
    needs_base: ClassVar[bool] = False
    model_count: ClassVar[tuple[int, int | None]] = (2, None)
    # A weighted sum carries every NaN/Inf of its inputs into the result: the engine checks only the result.
    propagates_non_finite: ClassVar[bool] = True

    def __post_init__(self):
        check_spec(self.weight, "linear: weight")


def _linear_merger(config: LinearConfig, plan, model_params):
    def merge_tensor(inputs):
        weights = [p["weight"] for p in inputs.params]
        # The inputs are ours to modify: the sum goes into the first one's buffer.
        return linear(inputs.tensors, weights, normalize=config.normalize, out=inputs.tensors[0])

    return merge_tensor


register("merge", "linear", LinearConfig, _linear_merger)
