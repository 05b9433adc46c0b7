"""Weighted average of whole models: the model soup.

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", arXiv 2203.05482.

``linear(tensors, weights) = sum_i w_i t_i / sum_i w_i`` (the division only when ``normalize``), the
definition of mergekit's ``linear`` method. The one difference: mergekit divides by a zero weight sum
and writes Inf/NaN weights; here that is refused with a clear error.
"""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.params import Spec, check_spec
from weightkit.registry import register

__all__ = ["linear", "LinearConfig"]

# A weight sum this small relative to the weights themselves is a cancellation ([0.1, 0.2, -0.3]), not a
# scale: dividing by it would blow the merged tensor up by ~1e16.
_ZERO_SUM_RTOL = 1e-8


def linear(tensors: list[Tensor], weights: list[float], *, normalize: bool = True) -> Tensor:
    """Weighted sum of same-shaped tensors, optionally divided by the sum of the weights.

    Args:
        tensors: the same tensor (same shape) from each model; not modified.
        weights: one weight per tensor; negative weights are allowed.
        normalize: divide by ``sum(weights)`` so that the weights need not sum to 1.

    Returns:
        A new tensor ``sum_i w_i t_i`` (``/ sum_i w_i`` when ``normalize``), in the inputs' dtype.

    Raises:
        WeightkitError: no tensors, a tensor/weight count or shape mismatch, or ``normalize`` with
            weights summing to zero.
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
    # One output buffer accumulated in place: a stacked [n_models, ...] copy would cost n_models
    # extra tensors on a 32000x4096 embedding.
    out = tensors[0] * float(weights[0])
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

    def __post_init__(self):
        check_spec(self.weight, "linear: weight")


def _linear_merger(config: LinearConfig, plan, model_params):
    def merge_tensor(inputs):
        return linear(inputs.tensors, [p["weight"] for p in inputs.params], normalize=config.normalize)

    return merge_tensor


register("merge", "linear", LinearConfig, _linear_merger)
