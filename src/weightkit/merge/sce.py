"""SCE (Select, Calculate, Erase): task vectors weighted by their own size, with TIES's sign election.

Paper: Wan, Zhong, Yang, Chen & Quan, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990
(its merging stage). This module implements mergekit 0.1.5's ``sce``. For each tensor, with the task
vectors ``d_i`` (each model's tensor minus the base's):

1. **Select** (only when ``select_topk < 1``): keep, in every ``d_i``, the entries whose variance across the
   models is among the top ``select_topk`` fraction of the non-zero variances, and zero the rest
   (:func:`weightkit.merge.sparsify.variance_select`).
2. **Calculate**: each model's weight is the mean of its (selected) ``d_i`` squared, divided by the sum of
   those means; as in mergekit, when that sum is below 1e-6 every model gets the weight ``1 / n`` instead.
   That happens for task vectors whose entries are around 1e-3 or smaller -- typical of real fine-tunes --
   so on such tensors SCE weighs the models equally, as mergekit does.
3. **Erase**: TIES's sign election over the *unweighted* ``d_i`` (:func:`weightkit.merge.task_arithmetic.
   elect_signs`): an entry whose sign differs from the sign of the sum over models is dropped.

The result is ``base + sum_i w_i a_i d_i / max(sum_i w_i a_i, 1e-6)`` per entry, with ``a_i`` 1 where
``d_i`` agrees with the elected sign and 0 elsewhere. mergekit's ``int8_mask`` is accepted and changes
nothing (it only picks the dtype of mergekit's masks).

The operations are mergekit's, in float32, over chunks of the task vectors instead of one stack of them,
so the output is mergekit's bit for bit on small tensors (the tests' tiny models) and to float32 rounding
on large ones, where torch may order a long sum differently. One deliberate difference: among entries of
equal variance at the select cut the lower index is kept (the order of mergekit's ``topk`` among ties is
unspecified).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.params import Spec, check_bool, check_range
from weightkit.merge.sparsify import variance_select
from weightkit.merge.task_arithmetic import elect_signs
from weightkit.registry import register

__all__ = ["sce", "sce_weights", "SCEConfig"]

# mergekit's floors: on the sum of the models' mean squares, and on each entry's divisor.
_WEIGHT_SUM_FLOOR = 1e-6
_DIVISOR_FLOOR = 1e-6
# Entries per step of the erase-and-average loop (each step stacks one chunk of every task vector).
_CHUNK = 2**20


def sce_weights(deltas: list[Tensor]) -> Tensor:
    """SCE's calculate step: each task vector's mean square over the sum of them (``1 / n`` each when that
    sum is below 1e-6, as in mergekit).

    Args:
        deltas: the (selected) task vectors of one tensor, one per model; not modified.

    Returns:
        A 1-D tensor of one weight per model, in the deltas' dtype, on their device.
    """
    # mergekit's float32 operations (a mean per model, their sum as a Python float), one model at a time
    # instead of over a stack of all of them: the same weights, bit for bit on tensors of up to ~10^5
    # entries (beyond, torch may split a long mean differently, a difference of float32 rounding).
    squares = torch.stack([d.square().mean() for d in deltas])
    total = torch.sum(squares).item()
    if abs(total) < _WEIGHT_SUM_FLOOR:
        return torch.ones_like(squares) / len(deltas)
    return squares / total


def sce(base: Tensor, tensors: list[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """Merge the models' tensors into the base's with SCE (see the module docstring).

    Args:
        base: the base model's tensor; not modified.
        tensors: the same tensor from each fine-tuned model, each of ``base``'s shape; modified (each
            becomes its selected task vector).
        select_topk: the fraction of entries (by variance across the models) the select step keeps; 1 skips
            the step, 0 keeps nothing (the result is the base).

    Returns:
        A new tensor of ``base``'s shape and dtype (a copy of ``base`` when ``tensors`` is empty).

    Raises:
        WeightkitError: a tensor whose shape differs from ``base``'s.
    """
    for i, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise WeightkitError(
                f"sce: tensor {i} has shape {tuple(tensor.shape)}, the base has {tuple(base.shape)}"
            )
    if not tensors:
        return base.clone()
    deltas = [t.sub_(base) for t in tensors]
    keep = variance_select(deltas, float(select_topk))
    if keep is not None:
        for delta in deltas:
            delta.masked_fill_(keep.logical_not(), 0.0)
    weights = sce_weights(deltas)[:, None]
    out = torch.empty_like(base)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [d.reshape(-1) for d in deltas]
    for start in range(0, flat_base.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        stacked = torch.stack([f[part] for f in flats])
        # The same operations as mergekit's, on a chunk of every task vector at a time.
        kept_weights = weights * elect_signs(stacked)
        mixed = (stacked * kept_weights).sum(dim=0)
        mixed.div_(kept_weights.sum(dim=0).clamp_(min=_DIVISOR_FLOOR))
        torch.add(flat_base[part], mixed, out=flat_out[part])
    return out


@dataclass
class SCEConfig:
    """SCE over a base and one or more fine-tuned models (``merge_method: sce``).

    Attributes:
        select_topk: the fraction of each tensor's entries, those varying most across the models, that the
            select step keeps, in [0, 1]; 1 (the default) skips the step. A number, a gradient over layers
            or filter entries.
        int8_mask: accepted so mergekit recipes run unchanged; no effect.
    """

    select_topk: Spec = 1.0
    int8_mask: bool = False

    per_tensor: ClassVar[tuple[str, ...]] = ("select_topk",)
    model_count: ClassVar[tuple[int, int | None]] = (1, None)
    # The select step and the sign election may drop a NaN/Inf entry: the inputs are checked.
    propagates_non_finite: ClassVar[bool] = False
    # Selections (variance top-k) per tensor: worth a GPU, as TIES's trim is (see merge()).
    computes_on_device: ClassVar[bool] = True

    def __post_init__(self):
        check_range(self.select_topk, "sce: select_topk", 0.0, 1.0)
        check_bool(self.int8_mask, "sce: int8_mask")


def _sce_merger(config: SCEConfig, plan, model_params):
    def merge_tensor(inputs):
        return sce(inputs.base, inputs.tensors, select_topk=inputs.values["select_topk"])

    return merge_tensor


register("merge", "sce", SCEConfig, _sce_merger)
