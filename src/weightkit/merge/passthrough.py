"""Passthrough: each output tensor is the one model's tensor, optionally scaled.

mergekit's ``passthrough`` method (Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language
Models", arXiv 2403.13257). Its use is ``slices``: each slice copies a layer range of one model, so the
slices stack layers of different models, or the same layers twice, into a deeper model (a "frankenmerge";
see :mod:`weightkit.merge.slices`). Under ``models`` it copies the one model listed.

``scale`` multiplies the model's tensors (mergekit's per-model ``scale``; none: copied unchanged). As
everywhere in weightkit the product is taken in float32 (mergekit takes it in the tensor's own dtype).
"""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from weightkit.merge.params import Spec, check_spec
from weightkit.registry import register

__all__ = ["passthrough", "PassthroughConfig"]


def passthrough(tensor: Tensor, scale: float | None = None) -> Tensor:
    """``tensor`` itself, or ``tensor * scale`` (in place) when a scale is given."""
    return tensor if scale is None else tensor.mul_(scale)


@dataclass
class PassthroughConfig:
    """Copy one model's tensors (``merge_method: passthrough``): one source per slice; no base model.

    Attributes:
        scale: a factor for the model's tensors (a model entry's ``scale`` overrides it): a number, a
            gradient over layers or filter entries (see :mod:`weightkit.merge.params`); None copies them.
    """

    scale: Spec | None = None

    per_model: ClassVar[tuple[str, ...]] = ("scale",)
    needs_base: ClassVar[bool] = False
    model_count: ClassVar[tuple[int, int | None]] = (1, 1)
    # A copy or a product carries every NaN/Inf of its input: the engine checks only the result.
    propagates_non_finite: ClassVar[bool] = True

    def __post_init__(self):
        if self.scale is not None:
            check_spec(self.scale, "passthrough: scale")


def _passthrough_merger(config: PassthroughConfig, plan, model_params):
    def merge_tensor(inputs):
        (tensor,) = inputs.tensors
        return passthrough(tensor, inputs.params[0]["scale"])

    return merge_tensor


register("merge", "passthrough", PassthroughConfig, _passthrough_merger)
