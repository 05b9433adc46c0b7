"""NearSwap: move each entry of the base toward the other model by at most ``t``.

NearSwap is a mergekit method (Arcee's tool; mergekit's reference for it is the Hugging Face model card of
``alchemonaut/QuartetAnemoi-70B-t0.0001``); there is no paper and no arXiv id. This module implements
mergekit 0.1.5's ``nearswap``, operation for operation.

With the base model's tensor ``a``, the other model's ``b`` and the threshold ``t``, every entry gets its
own interpolation weight ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` and the result is
``w * b + (1 - w) * a``. For ``t >= 0`` that is ``a + clamp(b - a, -t, t)`` (up to the 1e-6 floor and
rounding): entries where the models differ by at most ``t`` take ``b``'s value, the others move ``t``
toward it, so a small ``t`` keeps the base and swaps in only the entries where the other model is near it.
A negative ``t`` gives ``a``.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.params import Spec, check_spec
from weightkit.registry import register

__all__ = ["nearswap", "NearSwapConfig"]

# mergekit's floor on |a - b|, so identical entries get weight t / 1e-6 (clamped to 1), not t / 0.
_FLOOR = 1e-6


def nearswap(a: Tensor, b: Tensor, t: float) -> Tensor:
    """``w * b + (1 - w) * a`` with ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)`` per entry.

    Args:
        a: the base model's tensor; not modified.
        b: the other model's tensor, same shape; not modified.
        t: the distance up to which an entry takes ``b``'s value (beyond it, the entry moves ``t`` toward
            ``b``).

    Returns:
        A new tensor of ``a``'s shape and dtype.

    Raises:
        WeightkitError: ``a`` and ``b`` have different shapes.
    """
    if a.shape != b.shape:
        raise WeightkitError(
            f"nearswap needs tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    weight = torch.sub(a, b).abs_().clamp_(min=_FLOOR)
    # mergekit's ``t / x`` is computed by torch as ``x.reciprocal() * t``: the same rounding here.
    weight.reciprocal_().mul_(float(t)).clamp_(0.0, 1.0)
    out = b * weight
    return out.add_(weight.neg_().add_(1.0).mul_(a))


@dataclass
class NearSwapConfig:
    """NearSwap of the base model and one other model (``merge_method: nearswap``).

    Attributes:
        t: required: the distance up to which an entry takes the other model's value (mergekit's examples
            use values like 0.0001); a number, a gradient over layers or filter entries.
    """

    t: Spec | None = None

    per_tensor: ClassVar[tuple[str, ...]] = ("t",)
    model_count: ClassVar[tuple[int, int | None]] = (1, 1)
    # |a - b| is NaN/Inf where an input is, and so is the result there (Inf * 0 is NaN): the engine checks
    # only the result.
    propagates_non_finite: ClassVar[bool] = True

    def __post_init__(self):
        if self.t is None:
            raise WeightkitError("nearswap needs t (e.g. parameters: {t: 0.0001}); it has no default")
        check_spec(self.t, "nearswap: t")


def _nearswap_merger(config: NearSwapConfig, plan, model_params):
    def merge_tensor(inputs):
        return nearswap(inputs.base, inputs.tensors[0], inputs.values["t"])

    return merge_tensor


register("merge", "nearswap", NearSwapConfig, _nearswap_merger)
