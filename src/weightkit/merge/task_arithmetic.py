"""Task arithmetic: the core shared by task arithmetic, TIES, DARE, Breadcrumbs and DELLA, and their presets.

A fine-tuned model's *task vector* (delta) is its weights minus the base model's. Merging adds a weighted
combination of task vectors back onto the base:

- Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089 --
  ``base + scale * sum_i w_i delta_i`` (:func:`task_arithmetic`).
- TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", arXiv 2306.01708 --
  trim each delta to its largest entries, elect a sign per entry (:func:`elect_signs`), and average only
  the deltas that agree with it (``sign_consensus=True, normalize=True``).
- DARE (arXiv 2311.03099), Model Breadcrumbs (arXiv 2312.06795) and DELLA (arXiv 2406.11617) sparsify the
  task vectors differently before the same combination.

The sparsifiers (which entries each method keeps) are in :mod:`weightkit.merge.sparsify`, with their
papers and their deliberate differences from mergekit. This module follows mergekit's
``generalized_task_arithmetic``; outputs equal mergekit's given the same sparsified inputs except that
weights summing to zero are refused under ``normalize`` without sign consensus (mergekit divides by 1).
The presets (``merge_method: ties`` ...) are registered here: :class:`TaskArithmeticConfig`.
"""

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.engine import task_vectors
from weightkit.merge.linear import linear
from weightkit.merge.params import Spec, check_range, check_spec
from weightkit.merge.sparsify import (
    breadcrumbs_prune,
    della_prune,
    magnitude_prune,
    model_magnitude_thresholds,
    random_drop,
    threshold_prune,
)
from weightkit.registry import register

__all__ = ["elect_signs", "task_arithmetic", "sign_conflict_rate", "TaskArithmeticConfig"]


def elect_signs(weighted_deltas: Tensor) -> Tensor:
    """TIES sign election over stacked weighted task vectors.

    The elected sign of an entry is the sign of the sum over models (a sum of exactly 0 elects +). An
    entry agrees when its own sign equals the elected one; a zero entry (trimmed, or a zero weight) has
    no sign and never agrees, so it is left out of the disjoint mean's divisor. This is mergekit's
    ``get_mask(method="sum")``.

    Args:
        weighted_deltas: ``[n_models, ...]``, model ``i``'s task vector times its weight.

    Returns:
        A bool mask of the same shape, True where the entry agrees with the elected sign.
    """
    positive = weighted_deltas.sum(dim=0) >= 0
    return torch.where(positive, weighted_deltas > 0, weighted_deltas < 0)


def task_arithmetic(
    base: Tensor,
    deltas: list[Tensor],
    weights: list[float],
    *,
    sign_consensus: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Add a weighted combination of task vectors to the base: the core of every task-vector preset.

    With ``weighted_i = w_i * delta_i``: if ``sign_consensus``, only entries agreeing with
    :func:`elect_signs` over the ``weighted_i`` are kept; ``mixed`` is the sum of the kept
    ``weighted_i``; if ``normalize``, ``mixed`` is divided per entry by the sum of the ``w_i`` whose
    entries were kept (by 1 where that sum is 0; without sign consensus the divisor is ``sum(w_i)``, and
    weights summing to zero are refused, where mergekit silently divides by 1); the result is
    ``base + scale * mixed``. TIES is ``sign_consensus=True, normalize=True`` on trimmed deltas; plain
    task arithmetic is both False.

    Args:
        base: the base model's tensor; not modified.
        deltas: one task vector per fine-tuned model (already sparsified if the preset does so), each
            of ``base``'s shape; not modified.
        weights: one weight per task vector.
        sign_consensus: drop entries whose weighted sign disagrees with the elected sign (TIES).
        normalize: divide by the sum of the weights that contributed (TIES's disjoint mean).
        scale: multiplies the combined task vector (mergekit's ``lambda``).
        out: where to write the result (contiguous, ``base``'s shape and dtype); may be ``base`` itself,
            which saves allocating a tensor (each chunk of ``base`` is read before that chunk of the result
            is written).

    Returns:
        A tensor of ``base``'s shape and dtype: new, or ``out`` (a copy of ``base`` when ``deltas`` is empty).

    Raises:
        WeightkitError: a delta/weight count mismatch, a delta whose shape differs from ``base``, an
            ``out`` of another shape or dtype or not contiguous, or ``normalize`` without sign consensus on
            weights that sum to zero.
    """
    if len(deltas) != len(weights):
        raise WeightkitError(f"task_arithmetic got {len(deltas)} task vectors but {len(weights)} weights")
    for i, delta in enumerate(deltas):
        if delta.shape != base.shape:
            raise WeightkitError(
                f"task_arithmetic: task vector {i} has shape {tuple(delta.shape)}, the base has "
                f"{tuple(base.shape)}"
            )
    if out is not None and (out.shape != base.shape or out.dtype != base.dtype or not out.is_contiguous()):
        raise WeightkitError(
            f"task_arithmetic: out must be a contiguous {base.dtype} tensor of the base's shape "
            f"{tuple(base.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    if not deltas:
        return base.clone() if out is None else out.copy_(base)

    weights = [float(w) for w in weights]
    out = torch.empty_like(base) if out is None else out
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_deltas = [d.reshape(-1) for d in deltas]
    # Chunks of the flattened tensors: every step is elementwise, so the result is the same, and the
    # temporaries (elected signs, sums, divisor) are a few MB instead of copies of a 32000x4096 embedding.
    # One buffer receives every chunk's weighted sum: fresh memory per chunk would be page-faulted in anew.
    mixed_buffer = torch.empty(min(_CHUNK, flat_base.numel()), dtype=base.dtype, device=base.device)
    for start in range(0, flat_base.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        chunks = [d[part] for d in flat_deltas]
        mixed = _mix(chunks, weights, sign_consensus, normalize, mixed_buffer[: chunks[0].numel()])
        if scale != 1:
            mixed.mul_(scale)
        torch.add(flat_base[part], mixed, out=flat_out[part])
    return out


# Entries per step of task_arithmetic and sign_conflict_rate (16 MB of float32).
_CHUNK = 2**22


def _mix(
    deltas: list[Tensor], weights: list[float], sign_consensus: bool, normalize: bool, out: Tensor
) -> Tensor:
    """The combined task vector of flat chunks (see :func:`task_arithmetic`), written to ``out``."""
    if not sign_consensus:
        return linear(deltas, weights, normalize=normalize, out=out)  # refuses weights that sum to zero
    # Streaming one model at a time gives exactly elect_signs on the stacked weighted deltas, without an
    # [n_models, ...] stack and mask. With the elected sign s = +-1, an entry agrees when
    # s * w_i * delta_i > 0, so clamp(s * w_i * delta_i, min=0) is the agreeing part (times s) and its
    # sign (0 or 1) marks it: float arithmetic only, which runs several times faster than bool masks.
    elected = linear(deltas, weights, normalize=False)
    elected = torch.where(elected >= 0, 1.0, -1.0).to(elected.dtype)
    mixed = out.zero_()
    divisor = torch.zeros_like(elected) if normalize else None
    for delta, weight in zip(deltas, weights, strict=True):
        agreeing = (delta * weight).mul_(elected).clamp_(min=0.0)
        mixed.add_(agreeing)
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=weight)
    mixed.mul_(elected)
    if divisor is not None:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed


def sign_conflict_rate(deltas: list[Tensor]) -> float:
    """Fraction of entries where the non-zero task vectors do not all share one sign.

    An entry conflicts when at least one delta is > 0 there and at least one is < 0; zeros are ignored.

    Args:
        deltas: task vectors of one shape; not modified.

    Returns:
        A float in ``[0, 1]`` (0.0 for no deltas or empty tensors).

    Raises:
        WeightkitError: the deltas' shapes differ.
    """
    if not deltas or deltas[0].numel() == 0:
        return 0.0
    for i, delta in enumerate(deltas):
        if delta.shape != deltas[0].shape:
            raise WeightkitError(
                f"sign_conflict_rate: task vector {i} has shape {tuple(delta.shape)}, task vector 0 has "
                f"{tuple(deltas[0].shape)}"
            )
    # Mixed signs where the largest delta is > 0 and the smallest < 0: min/max in float, one mask per chunk.
    flats = [d.reshape(-1) for d in deltas]
    conflicts = 0
    for start in range(0, flats[0].numel(), _CHUNK):
        largest = flats[0][start : start + _CHUNK].clone()
        smallest = largest.clone()
        for flat in flats[1:]:
            torch.maximum(largest, flat[start : start + _CHUNK], out=largest)
            torch.minimum(smallest, flat[start : start + _CHUNK], out=smallest)
        # count_nonzero, not sum: summing a bool tensor first converts it to int64 (8 bytes an entry).
        conflicts += int(torch.count_nonzero((largest > 0).logical_and_(smallest < 0)))
    return conflicts / flats[0].numel()


# --------------------------------------------------------------------------------------- config + presets

_SPARSIFIERS = (None, "magnitude", "random", "breadcrumbs", "della")


@dataclass
class TaskArithmeticConfig:
    """The task-vector family: one config, named presets (mergekit's names and defaults).

    ======================  ===============  ==============  =========  =======
    preset (merge_method)   sparsify         sign_consensus  normalize  rescale
    ======================  ===============  ==============  =========  =======
    task_arithmetic         None             no              no         no
    ties                    magnitude        yes             yes        no
    dare_linear             random           no              no         yes
    dare_ties               random           yes             no         yes
    breadcrumbs             breadcrumbs      no              no         no
    breadcrumbs_ties        breadcrumbs      yes             no         no
    della_linear            della            no              no         yes
    della                   della            yes             yes        yes
    ======================  ===============  ==============  =========  =======

    Attributes:
        weight: each model's task-vector weight (a model entry's ``weight`` overrides it). Numbers,
            gradients over layers and filter entries are accepted for every per-model parameter.
        density: fraction of each task vector kept by the sparsifier, in (0, 1]; 1 keeps everything.
        gamma: Breadcrumbs: fraction of largest-magnitude entries dropped as outliers, in [0, 1].
        epsilon: DELLA: half the spread of keep probabilities over magnitude ranks (>= 0).
        sparsify: None, "magnitude" (TIES trim), "random" (DARE), "breadcrumbs" or "della".
        sign_consensus: TIES sign election: drop entries whose sign disagrees with the weighted majority.
        normalize: divide by the sum of the weights that contributed to each entry.
        rescale: random sparsifiers: divide kept entries by their keep probability (the papers).
        scale: multiplies the merged task vector (mergekit's ``lambda``).
        scope: "magnitude" only: "tensor" (default, as mergekit) trims each tensor to its own top
            ``density``; "model" trims each model's whole task vector to its top ``density``, as in the
            TIES paper, at the cost of two extra read passes over all models.
        seed: random sparsifiers: the seed; each tensor and model gets its own stream derived from it
            and the tensor's name, so results do not depend on tensor order. The stream is that of the
            device the tensors are merged on: the same seed gives the same masks on the same kind of
            device, other masks on a GPU than on the CPU.
        int8_mask: accepted so mergekit recipes run unchanged; no effect (masks here are already 1 byte).
    """

    weight: Spec = 1.0
    density: Spec = 1.0
    gamma: Spec = 0.01
    epsilon: Spec = 0.15
    sparsify: str | None = None
    sign_consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    scale: Spec = 1.0
    scope: str = "tensor"
    seed: int = 0
    int8_mask: bool = False

    per_model: ClassVar[tuple[str, ...]] = ("weight", "density", "gamma", "epsilon")
    per_tensor: ClassVar[tuple[str, ...]] = ("scale",)

    @property
    def propagates_non_finite(self) -> bool:
        """Plain task arithmetic is a weighted sum: every NaN/Inf of an input reaches the result, so the
        engine checks only the result. A sparsifier may drop one, and the sign election may hide one."""
        return self.sparsify is None and not self.sign_consensus

    @property
    def computes_on_device(self) -> bool:
        """Sparsifying (selections, sorts, random masks) is worth a GPU; a weighted sum is not (see merge)."""
        return self.sparsify is not None

    def __post_init__(self):
        if self.sparsify not in _SPARSIFIERS:
            raise WeightkitError(
                f"sparsify must be one of {', '.join(map(str, _SPARSIFIERS))}, got {self.sparsify!r}"
            )
        check_spec(self.weight, "weight")
        check_range(self.density, "density", 0.0, 1.0, low_open=True)
        check_range(self.gamma, "gamma", 0.0, 1.0)
        check_range(self.epsilon, "epsilon", 0.0, 1.0)
        check_spec(self.scale, "scale (lambda)")
        if self.rescale and self.sparsify not in ("random", "della"):
            raise WeightkitError("rescale applies to random sparsification (DARE, DELLA) only")
        if self.scope not in ("tensor", "model"):
            raise WeightkitError(f"scope must be 'tensor' or 'model', got {self.scope!r}")
        if self.scope == "model" and (self.sparsify != "magnitude" or isinstance(self.density, list)):
            raise WeightkitError("scope 'model' needs sparsify 'magnitude' and one density number per model")


def _seed(seed: int, tensor: str, model: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(tensor.encode()) * 131 + model) % 2**63


class _TaskArithmeticMerger:
    """Sparsify each task vector, combine them, and count sign conflicts for the summary."""

    def __init__(self, config: TaskArithmeticConfig, plan, model_densities: list[float]):
        self.config = config
        self.conflicts = 0.0
        self.entries = 0
        self.thresholds = None
        if config.scope == "model":
            self.thresholds = model_magnitude_thresholds(lambda: task_vectors(plan), model_densities)

    def _sparsify(self, delta: Tensor, p: dict, name: str, i: int) -> Tensor:
        c = self.config
        if self.thresholds is not None:
            return threshold_prune(delta, self.thresholds[i])
        if c.sparsify == "magnitude":
            return magnitude_prune(delta, p["density"])
        if c.sparsify == "breadcrumbs":
            return breadcrumbs_prune(delta, p["density"], p["gamma"])
        generator = torch.Generator(delta.device).manual_seed(_seed(c.seed, name, i))
        if c.sparsify == "random":
            return random_drop(delta, p["density"], generator, rescale=c.rescale)
        return della_prune(delta, p["density"], p["epsilon"], generator, rescale=c.rescale)

    def __call__(self, inputs) -> Tensor:
        deltas = inputs.tensors  # ours to modify: each becomes its task vector, then its sparsified one
        for tensor in deltas:
            tensor.sub_(inputs.base)
        if self.config.sign_consensus:
            self.conflicts += sign_conflict_rate(deltas) * inputs.base.numel()
            self.entries += inputs.base.numel()
        if self.config.sparsify is not None:
            for i, p in enumerate(inputs.params):
                deltas[i] = self._sparsify(deltas[i], p, inputs.name, i)  # frees the unsparsified one
        return task_arithmetic(
            inputs.base,
            deltas,
            [p["weight"] for p in inputs.params],
            sign_consensus=self.config.sign_consensus,
            normalize=self.config.normalize,
            scale=inputs.values["scale"],
            out=inputs.base,  # ours too: the result goes into the base's buffer
        )

    def report(self) -> dict:
        if not self.config.sign_consensus:
            return {}
        return {"sign_conflict_rate": self.conflicts / self.entries if self.entries else 0.0}


def _task_arithmetic_merger(config: TaskArithmeticConfig, plan, model_params: list[dict]):
    # Whole-model scope takes one density number per model (checked by the config).
    densities = [float(p["density"]) for p in model_params] if config.scope == "model" else []
    return _TaskArithmeticMerger(config, plan, densities)


_PRESETS = {
    "task_arithmetic": dict(sparsify=None, sign_consensus=False),
    "ties": dict(sparsify="magnitude", sign_consensus=True, normalize=True),
    "dare_linear": dict(sparsify="random", sign_consensus=False, rescale=True),
    "dare_ties": dict(sparsify="random", sign_consensus=True, rescale=True),
    "breadcrumbs": dict(sparsify="breadcrumbs", sign_consensus=False),
    "breadcrumbs_ties": dict(sparsify="breadcrumbs", sign_consensus=True),
    "della_linear": dict(sparsify="della", sign_consensus=False, rescale=True),
    "della": dict(sparsify="della", sign_consensus=True, normalize=True, rescale=True),
}
for _name, _preset in _PRESETS.items():
    register("merge", _name, TaskArithmeticConfig, _task_arithmetic_merger, preset=_preset)
