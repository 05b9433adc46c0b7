"""Metrics-Weighted Averaging (MWA): average checkpoints of one run, weighted by their loss or step.

Paper: Yu & Choi, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging",
arXiv 2504.18580 (2025).

The paper merges checkpoints (typically LoRA adapters) saved along one fine-tuning run with a weighted
average whose weights come from a metric of each checkpoint, the training loss (lower is better) or the
training step (later is better), shaped by a single "penalty factor" whatever the number of
checkpoints. The merge itself is the weighted linear average :func:`weightkit.merge.linear.linear`.

**The weighting formula implemented here is a reconstruction, not the paper's verified equation.** The
paper's method section could not be retrieved (only its abstract and figure labels, which show penalty
factors 0.5, 0.7, 0.8 and 1.0 for loss and step weighting). This module implements the most faithful
reading of the abstract: a power law in the metric, with the penalty factor ``p >= 0`` as exponent,

    loss:  w_i = L_i^(-p) / sum_j L_j^(-p)
    step:  w_i = s_i^p    / sum_j s_j^p

so that

- ``p = 0`` gives the uniform average (the paper's baseline);
- ``p = 1`` weighs in proportion to ``1 / loss`` (or to the step);
- a larger ``p`` concentrates the weight on the lowest-loss (latest) checkpoint, and ``p -> inf`` keeps
  only that one; the weights depend on metric *ratios* only, so rescaling every loss (or step) by one
  constant changes nothing, and one ``p`` serves any number of checkpoints.

Weights are computed in log space (``exp(-p ln L_i - max)``), so a large ``p`` cannot overflow.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.linear import linear
from weightkit.registry import register

__all__ = ["MWA_KINDS", "mwa_weights", "mwa_merge", "MWAConfig"]

MWA_KINDS = ("loss", "step")


def mwa_weights(metrics: Sequence[float], *, kind: str, penalty: float) -> list[float]:
    """Normalised merging weights from each checkpoint's training loss or training step.

    ``kind="loss"``: ``w_i = L_i^(-p) / sum_j L_j^(-p)`` (lower loss, more weight).
    ``kind="step"``: ``w_i = s_i^p / sum_j s_j^p`` (later step, more weight; a step-0 checkpoint gets 0
    when ``p > 0``). ``p = 0`` is the uniform average; a larger ``p`` concentrates the weight on the best
    checkpoint. See the module docstring: this formula is a reconstruction of the paper's.

    Args:
        metrics: one value per checkpoint, in any order: losses (finite, > 0) or steps (finite, >= 0,
            at least one > 0 when ``penalty > 0``).
        kind: ``"loss"`` or ``"step"``.
        penalty: the penalty factor ``p`` (finite, >= 0).

    Returns:
        One weight per checkpoint, in the order of ``metrics``, each in ``[0, 1]``, summing to 1.

    Raises:
        WeightkitError: an empty list, an unknown ``kind``, a non-finite, negative or zero loss, a
            negative step, all steps zero with ``penalty > 0``, or a negative or non-finite penalty.
    """
    if kind not in MWA_KINDS:
        raise WeightkitError(f"unknown MWA kind {kind!r}: expected 'loss' or 'step'")
    values = [float(m) for m in metrics]
    if not values:
        raise WeightkitError("MWA needs the metric of at least one checkpoint")
    if not math.isfinite(penalty) or penalty < 0:
        raise WeightkitError(f"MWA penalty factor must be finite and >= 0, got {penalty}")
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise WeightkitError(f"MWA: the {kind} of checkpoint {i} is {value}; metrics must be finite")
        if kind == "loss" and value <= 0:
            raise WeightkitError(
                f"MWA: the loss of checkpoint {i} is {value}; loss weighting needs losses > 0 "
                "(weights are powers of 1 / loss)"
            )
        if kind == "step" and value < 0:
            raise WeightkitError(f"MWA: the step of checkpoint {i} is {value}; steps must be >= 0")
    if penalty == 0:
        return [1.0 / len(values)] * len(values)
    if kind == "step" and all(value == 0 for value in values):
        raise WeightkitError("MWA: every checkpoint is at step 0, so step weighting gives no weight to any")

    sign = -1.0 if kind == "loss" else 1.0
    logs = [sign * penalty * math.log(v) if v > 0 else -math.inf for v in values]
    top = max(logs)
    raw = [math.exp(x - top) for x in logs]
    total = math.fsum(raw)
    return [r / total for r in raw]


def mwa_merge(tensors: list[Tensor], metrics: Sequence[float], *, kind: str, penalty: float) -> Tensor:
    """The MWA merge of one tensor: ``linear(tensors, mwa_weights(metrics, kind=kind, penalty=penalty))``.

    Args:
        tensors: the same tensor from each checkpoint, in the order of ``metrics``; not modified.
        metrics: each checkpoint's training loss or step (see :func:`mwa_weights`).
        kind: ``"loss"`` or ``"step"``.
        penalty: the penalty factor.

    Returns:
        A new tensor, the weighted average, in the inputs' dtype.

    Raises:
        WeightkitError: as :func:`mwa_weights`, or mismatched tensor count or shapes.
    """
    if len(tensors) != len(metrics):
        raise WeightkitError(f"MWA got {len(tensors)} tensors but {len(metrics)} metrics")
    return linear(tensors, mwa_weights(metrics, kind=kind, penalty=penalty))


@dataclass
class MWAConfig:
    """Metrics-Weighted Averaging of checkpoints of one run (``merge_method: mwa``); no base model.

    Each model entry gives its ``metric``: its training loss (``kind: loss``) or step (``kind: step``)::

        models:
          - {model: ./ckpt-1000, parameters: {metric: 0.91}}
          - {model: ./ckpt-2000, parameters: {metric: 0.78}}
        merge_method: mwa
        parameters: {kind: loss, penalty: 1.0}

    Attributes:
        kind: "loss" (lower loss weighs more) or "step" (later step weighs more).
        penalty: the penalty factor ``p >= 0``: 0 is the uniform average, larger concentrates the weight
            on the best checkpoint (see the module docstring for the formula and its caveat).
        metric: a default metric for models that give none (normally every model gives its own).
    """

    kind: str = "loss"
    penalty: float = 1.0
    metric: float | None = None

    per_model: ClassVar[tuple[str, ...]] = ("metric",)
    needs_base: ClassVar[bool] = False
    model_count: ClassVar[tuple[int, int | None]] = (2, None)

    def __post_init__(self):
        if self.kind not in MWA_KINDS:
            raise WeightkitError(f"mwa: kind must be one of {', '.join(MWA_KINDS)}, got {self.kind!r}")
        mwa_weights([1.0], kind=self.kind, penalty=self.penalty)  # validates the penalty
        if self.metric is not None and (
            isinstance(self.metric, bool) or not isinstance(self.metric, int | float)
        ):
            raise WeightkitError(f"mwa: metric must be one number per model, got {self.metric!r}")


def _mwa_merger(config: MWAConfig, plan, model_params):
    metrics = [p["metric"] for p in model_params]
    if any(m is None for m in metrics):
        raise WeightkitError("mwa: every model needs its metric (parameters: {metric: its loss or step})")
    mwa_weights(metrics, kind=config.kind, penalty=config.penalty)  # refuse bad metrics before reading

    def merge_tensor(inputs):
        return mwa_merge(inputs.tensors, metrics, kind=config.kind, penalty=config.penalty)

    return merge_tensor


register("merge", "mwa", MWAConfig, _mwa_merger)
