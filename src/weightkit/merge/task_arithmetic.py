"""Task arithmetic and its sparsifiers: the core shared by task arithmetic, TIES, DARE, Breadcrumbs and DELLA.

A fine-tuned model's *task vector* (delta) is its weights minus the base model's. Merging adds a weighted
combination of task vectors back onto the base:

- Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic", arXiv 2212.04089 --
  ``base + scale * sum_i w_i delta_i`` (:func:`task_arithmetic`).
- TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", arXiv 2306.01708 --
  trim each delta to its largest entries (:func:`magnitude_prune`), elect a sign per entry
  (:func:`elect_signs`), and average only the deltas that agree with it (``sign_consensus=True,
  normalize=True``).
- DARE: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch", arXiv 2311.03099 -- drop entries at random and rescale the rest (:func:`random_drop`).
- Model Breadcrumbs: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
  Masks", arXiv 2312.06795 -- drop both the smallest entries and the largest outliers
  (:func:`breadcrumbs_prune`).
- DELLA: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
  Sampling", arXiv 2406.11617 -- drop entries at random with a keep probability that grows with their
  magnitude rank, and rescale by it (:func:`della_prune`).

The definitions follow mergekit's ``generalized_task_arithmetic`` and ``sparsify`` modules, so outputs
equal mergekit's given the same inputs except where a function's docstring says otherwise. The deliberate
differences, in one place:

- The random sparsifiers draw their masks as ``uniform < p`` from a generator seeded per tensor and model
  (the same distribution as mergekit's ``torch.bernoulli`` on its global stream, not the same draws).
- ``random_drop`` and ``della_prune`` rescale kept entries by ``1/p`` as their papers do; mergekit (with
  its default ``rescale: true``) instead multiplies the pruned tensor by ``|delta|_1 / |pruned|_1``,
  which equals ``1/p`` only in expectation.
- ``magnitude_prune`` returns zeros when ``int(density * numel)`` is 0, where mergekit stops with an
  assertion; ``breadcrumbs_prune`` keeps its band when ``int(gamma * numel)`` is 0, where mergekit's
  ``indices[n_bot:-0]`` selects nothing and zeroes the whole tensor.
- ``della_prune`` ranks within rows of ``delta.reshape(shape[0], -1)`` for tensors of 3 or more
  dimensions (mergekit ranks along dim 1 only), accepts ``density + epsilon == 1`` (mergekit requires
  ``< 1``), and gives a one-entry row the keep probability ``density`` (mergekit divides 0 by 0).
- A density <= 0 is refused here (mergekit returns zeros for some sparsifiers).
- Ties in ``|delta|`` are broken the same way everywhere (the lower flattened index ranks higher), where
  mergekit's order among equal magnitudes is whatever its unstable sort gives.
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
from weightkit.registry import register

__all__ = [
    "magnitude_prune",
    "random_drop",
    "breadcrumbs_prune",
    "della_prune",
    "elect_signs",
    "task_arithmetic",
    "sign_conflict_rate",
    "threshold_prune",
    "model_magnitude_thresholds",
    "TaskArithmeticConfig",
]


def _check_density(density: float, method: str) -> None:
    if not density > 0:
        raise WeightkitError(f"{method}: density must be > 0 (1 keeps every entry), got {density}")


# A float32 >= 0 read as an int32 keeps its order; its top 16 bits (the sign bit is 0) name one of 32768
# buckets, each 1/128 of a power of two wide. Counting entries per bucket (one bincount) finds the bucket
# holding the k-th largest magnitude, and only that bucket's entries need a selection: ~4x faster than
# torch.kthvalue over every entry, and the same value. Also used across a whole model, tensor by tensor.
_BUCKET_SHIFT = 16
_BUCKETS = 1 << 15


def _buckets(magnitude: Tensor) -> Tensor:
    return magnitude.reshape(-1).view(torch.int32).bitwise_right_shift(_BUCKET_SHIFT)


def _bucket_of_kth(counts: Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry (1-based) given per-bucket counts, and its rank in it."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    above = int(from_top[position - 1]) if position > 0 else 0
    return _BUCKETS - 1 - position, k - above


def _kth_in(values: Tensor, rank: int) -> Tensor:
    """The ``rank``-th largest (1-based) of ``values``."""
    return torch.kthvalue(values, values.numel() - rank + 1).values


def _kth_largest(magnitude: Tensor, k: int) -> Tensor:
    """The k-th largest entry of a flat non-negative tensor (1 <= k <= numel)."""
    if magnitude.dtype != torch.float32:
        return _kth_in(magnitude, k)
    buckets = _buckets(magnitude)
    bucket, rank = _bucket_of_kth(torch.bincount(buckets, minlength=_BUCKETS), k)
    return _kth_in(magnitude[buckets == bucket], rank)


def _largest_mask(magnitude: Tensor, k: int) -> Tensor:
    """Bool mask of exactly ``k`` entries of a flat non-negative tensor, the largest ones.

    Among equal magnitudes the lower index ranks higher. Ties at a threshold of 0 are not filled: those
    entries are zeros, so keeping or dropping them gives the same tensor, and listing millions of zero
    entries (a frozen embedding's delta) would cost 8 bytes each.
    """
    n = magnitude.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = _kth_largest(magnitude, k)
    mask = magnitude > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0 and bool(threshold > 0):
        ties = torch.nonzero(magnitude == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """TIES trim: keep the ``k = int(density * numel)`` entries of largest magnitude, zero the rest.

    Exactly ``k`` entries are kept; among equal magnitudes at the cut the lower (flattened) index wins.
    ``k = 0`` (a tiny tensor at a low density) gives all zeros.

    Args:
        delta: a task vector; not modified.
        density: fraction of entries to keep, > 0; ``>= 1`` keeps everything.

    Returns:
        A new tensor, or ``delta`` itself (not a copy) when ``density >= 1``.

    Raises:
        WeightkitError: ``density <= 0``.
    """
    _check_density(density, "magnitude_prune")
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    magnitude = flat.abs()
    drop = _largest_mask(magnitude, int(density * flat.numel())).logical_not_()
    # The magnitudes are no longer needed: their buffer becomes the output. (masked_fill_, because
    # multiplying by a bool mask would make a float copy of it.)
    return magnitude.copy_(flat).masked_fill_(drop, 0.0).view(delta.shape)


def random_drop(delta: Tensor, density: float, generator: torch.Generator, *, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept entries by ``density``.

    The keep mask is ``torch.rand(delta.shape, generator=generator) < density`` (a uniform draw compared
    in place: 2-3x faster than ``torch.bernoulli``, and each entry is still kept with probability
    ``density``), so the same generator state gives the same mask, and the expected value of the result
    is ``delta``.

    Args:
        delta: a task vector; not modified.
        density: keep probability, > 0; ``>= 1`` keeps everything.
        generator: the random stream, on ``delta``'s device.
        rescale: divide the kept entries by ``density`` (the paper); False keeps them as they are.

    Returns:
        A new tensor, or ``delta`` itself (not a copy, no random draw) when ``density >= 1``.

    Raises:
        WeightkitError: ``density <= 0``.
    """
    _check_density(density, "random_drop")
    if density >= 1:
        return delta
    uniform = torch.rand(delta.shape, generator=generator, dtype=delta.dtype, device=delta.device)
    out = uniform.lt_(density).mul_(delta)  # the draws' buffer becomes the output
    return out.div_(density) if rescale else out


def breadcrumbs_prune(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries.

    Counts follow mergekit's ``magnitude_outliers``: with ``n = numel``, ``n_top = int(gamma * n)``
    and ``n_bottom = n - int(density * n) - n_top``; if ``n_bottom < 0`` the outliers removed shrink to
    ``n_top + n_bottom`` and ``n_bottom`` becomes 0. The kept band is ranks ``[n_bottom, n - n_top)`` in
    increasing magnitude (among equal magnitudes the lower index ranks higher): always exactly
    ``int(density * n)`` entries.

    Args:
        delta: a task vector; not modified.
        density: fraction of entries to keep, > 0; ``>= 1`` keeps everything (outliers included, as in
            mergekit).
        gamma: fraction of entries, largest in magnitude, to drop as outliers, in ``[0, 1]``.

    Returns:
        A new tensor, or ``delta`` itself (not a copy) when ``density >= 1``.

    Raises:
        WeightkitError: ``density <= 0`` or ``gamma`` outside ``[0, 1]``.
    """
    _check_density(density, "breadcrumbs_prune")
    if not 0 <= gamma <= 1:
        raise WeightkitError(f"breadcrumbs_prune: gamma must be in [0, 1], got {gamma}")
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    n_keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = n - n_keep - n_top
    if n_bottom < 0:
        n_top += n_bottom
    magnitude = flat.abs()
    # The band is the n_keep + n_top largest minus the n_top largest; with the same tie rule the second
    # set lies inside the first, so exactly n_keep entries remain.
    drop = _largest_mask(magnitude, n_keep + n_top).logical_not_()
    if n_top > 0:
        drop.logical_or_(_largest_mask(magnitude, n_top))
    return magnitude.copy_(flat).masked_fill_(drop, 0.0).view(delta.shape)


def della_prune(
    delta: Tensor, density: float, epsilon: float, generator: torch.Generator, *, rescale: bool = True
) -> Tensor:
    """DELLA's MagPrune: keep entries with a probability that grows with their magnitude rank in the row.

    Rows are ``delta.reshape(shape[0], -1)`` (a 1-D tensor is one row). In a row of ``n`` entries ranked
    ``r = 0 .. n-1`` by increasing ``|delta|`` (among equal magnitudes the lower index ranks higher),
    entry ``r`` is kept with probability ``p_r = (density - epsilon) + r / (n - 1) * 2 * epsilon``
    (``density`` when ``n = 1``), so the mean keep probability is ``density``. The mask is
    ``torch.rand((rows, n), generator=generator) < p`` (as in :func:`random_drop`), and each
    kept entry is divided by its own ``p_r`` (the paper's rescaling, which keeps the expected value of
    every entry equal to ``delta``).

    Compared with mergekit's ``della_magprune``: the ranks, probabilities and mask are the same for 1-D
    and 2-D tensors (ties in ``|delta|`` aside), but mergekit rescales the whole pruned tensor by
    ``|delta|_1 / |pruned|_1`` (``rescale: true``) or not at all, instead of by ``1/p_r`` per entry.

    Args:
        delta: a task vector; not modified.
        density: mean keep probability, > 0; ``>= 1`` keeps everything.
        epsilon: half the spread of keep probabilities across ranks, >= 0; ``density - epsilon`` must be
            > 0 and ``density + epsilon`` at most 1.
        generator: the random stream, on ``delta``'s device.
        rescale: divide each kept entry by its keep probability (the paper); False keeps it as it is.

    Returns:
        A new tensor, or ``delta`` itself (not a copy, no random draw) when ``density >= 1``.

    Raises:
        WeightkitError: ``density <= 0``, ``epsilon < 0``, or ``density ± epsilon`` outside ``(0, 1]``.
    """
    _check_density(density, "della_prune")
    if density >= 1:
        return delta
    if epsilon < 0:
        raise WeightkitError(f"della_prune: epsilon must be >= 0, got {epsilon}")
    if not (density - epsilon > 0 and density + epsilon <= 1):
        raise WeightkitError(
            f"della_prune: density ± epsilon must stay in (0, 1], got density {density} and epsilon "
            f"{epsilon} (keep probabilities {density - epsilon:g} to {density + epsilon:g})"
        )
    if delta.numel() == 0:
        return delta.clone()
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    if n == 1:
        by_rank = torch.full((1,), density, dtype=delta.dtype, device=delta.device)
    else:
        # Same operation order as mergekit's (rank_norm * 2 * epsilon), so the probabilities match it bit
        # for bit.
        by_rank = torch.arange(n, dtype=delta.dtype, device=delta.device) / (n - 1)
        by_rank = (density - epsilon) + by_rank * 2 * epsilon
        # density + epsilon == 1 may round a hair above 1, and a tiny
        # density - epsilon may round to 0 (dividing by it would turn dropped entries into NaN).
        by_rank.clamp_(min=torch.finfo(delta.dtype).tiny, max=1.0)
    # Largest first, stable: among equal magnitudes the lower index ranks higher, as in the other
    # sparsifiers, and the result does not depend on the sort algorithm.
    order = torch.argsort(rows.abs(), dim=1, descending=True, stable=True)
    # Scattering the probabilities (largest first) through the sort order gives each entry the
    # probability of its rank without a second argsort (mergekit ranks by argsort(argsort)).
    prob = torch.empty_like(rows).scatter_(1, order, by_rank.flip(0).expand_as(rows))
    del order
    uniform = torch.rand(rows.shape, generator=generator, dtype=rows.dtype, device=rows.device)
    out = uniform.lt_(prob).mul_(rows)
    return (out.div_(prob) if rescale else out).view(delta.shape)


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


# ------------------------------------------------------------------------------ whole-model magnitude trim


def threshold_prune(delta: Tensor, threshold: float) -> Tensor:
    """Keep the entries with ``|delta| >= threshold``, zero the rest (whole-model TIES trim).

    Returns:
        A new tensor, or ``delta`` itself when ``threshold <= 0`` (everything is kept).
    """
    if threshold <= 0:
        return delta
    return delta.masked_fill(delta.abs() < threshold, 0.0)


def model_magnitude_thresholds(delta_stream, densities: list[float]) -> list[float]:
    """Per model, the ``k = int(density * entries)``-th largest magnitude of its whole task vector.

    The TIES paper keeps the top-k% entries of each model's flattened task vector (all tensors together).
    This finds that cut exactly in two streamed passes, holding one tensor at a time plus the entries of
    one histogram bucket (about 1/128 of an octave of magnitudes).

    Args:
        delta_stream: a callable returning a fresh iterator over per-tensor lists of task vectors
            (``[delta_model_0, delta_model_1, ...]``); it is called twice.
        densities: the fraction of entries each model keeps, in (0, 1].

    Returns:
        One threshold per model; :func:`threshold_prune` with it keeps the top-k entries (all entries
        equal to the k-th largest magnitude are kept). 0.0 for a density of 1.
    """
    n = len(densities)
    counts = [torch.zeros(_BUCKETS, dtype=torch.int64) for _ in range(n)]
    totals = [0] * n
    for deltas in delta_stream():
        for i, delta in enumerate(deltas):
            counts[i] += torch.bincount(_buckets(delta.abs()), minlength=_BUCKETS).cpu()
            totals[i] += delta.numel()
    # Per model: the bucket holding the k-th largest, and the rank of that entry inside the bucket.
    wanted: list[tuple[int, int] | None] = []
    for i in range(n):
        k = int(densities[i] * totals[i])
        if densities[i] >= 1 or k >= totals[i]:
            wanted.append(None)
            continue
        if k <= 0:
            raise WeightkitError(f"density {densities[i]} keeps no entry of a {totals[i]}-entry model")
        wanted.append(_bucket_of_kth(counts[i], k))
    if all(w is None for w in wanted):
        return [0.0] * n
    inside: list[list[Tensor]] = [[] for _ in range(n)]
    for deltas in delta_stream():
        for i, delta in enumerate(deltas):
            if wanted[i] is not None:
                magnitude = delta.abs().reshape(-1)
                inside[i].append(magnitude[_buckets(magnitude) == wanted[i][0]])
    thresholds = []
    for i in range(n):
        if wanted[i] is None:
            thresholds.append(0.0)
            continue
        thresholds.append(float(_kth_in(torch.cat(inside[i]), wanted[i][1])))
    return thresholds


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
            and the tensor's name, so results do not depend on tensor order.
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
