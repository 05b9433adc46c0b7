"""The sparsifiers of task arithmetic: which entries of a task vector TIES, DARE, Breadcrumbs and DELLA keep.

Each takes one task vector (a fine-tune's weights minus the base's) and returns it with some entries
zeroed (and, for the random ones, the rest rescaled); :mod:`weightkit.merge.task_arithmetic` then combines
the sparsified task vectors.

- TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", arXiv 2306.01708 --
  keep the largest entries (:func:`magnitude_prune`; over a whole model: :func:`model_magnitude_thresholds`
  and :func:`threshold_prune`).
- DARE: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch", arXiv 2311.03099 -- drop entries at random and rescale the rest (:func:`random_drop`).
- Model Breadcrumbs: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
  Masks", arXiv 2312.06795 -- drop both the smallest entries and the largest outliers
  (:func:`breadcrumbs_prune`).
- DELLA: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
  Sampling", arXiv 2406.11617 -- drop entries at random with a keep probability that grows with their
  magnitude rank, and rescale by it (:func:`della_prune`).
- SCE's select step: Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990 -- keep
  the entries whose values vary most across the task vectors, in every task vector at once
  (:func:`variance_select`; the rest of SCE is in :mod:`weightkit.merge.sce`).

The definitions follow mergekit's ``sparsify`` module, so outputs equal mergekit's given the same inputs
except where a function's docstring says otherwise. The deliberate differences, in one place:

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
- Ties in ``|delta|`` (and in SCE's variances) are broken the same way everywhere (the lower flattened index
  ranks higher), where mergekit's order among equal values is whatever its unstable sort or top-k gives.
"""

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.kth import StreamedKthSmallest, kth_smallest

__all__ = [
    "magnitude_prune",
    "random_drop",
    "breadcrumbs_prune",
    "della_prune",
    "threshold_prune",
    "model_magnitude_thresholds",
    "variance_select",
]


def _check_density(density: float, method: str) -> None:
    if not density > 0:
        raise WeightkitError(f"{method}: density must be > 0 (1 keeps every entry), got {density}")


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
    threshold = kth_smallest(magnitude, n - k)  # the k-th largest
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
    This finds that cut exactly in two streamed passes (radix selection, :mod:`weightkit.merge.kth`),
    holding one tensor at a time.

    Args:
        delta_stream: a callable returning a fresh iterator over per-tensor lists of task vectors
            (``[delta_model_0, delta_model_1, ...]``); it is called twice.
        densities: the fraction of entries each model keeps, in (0, 1].

    Returns:
        One threshold per model; :func:`threshold_prune` with it keeps the top-k entries (all entries
        equal to the k-th largest magnitude are kept). 0.0 for a density of 1.

    Raises:
        WeightkitError: a density that keeps no entry of a model.
    """
    n = len(densities)
    # The k-th largest of N entries is the (N - k)-th smallest; N is known after the first pass.
    selects = [StreamedKthSmallest(0) for _ in range(n)]
    totals = [0] * n
    for deltas in delta_stream():
        for i, delta in enumerate(deltas):
            selects[i].update(delta.abs())
            totals[i] += delta.numel()
    wanted = []
    for i in range(n):
        k = int(densities[i] * totals[i])
        if densities[i] >= 1 or k >= totals[i]:
            continue
        if k <= 0:
            raise WeightkitError(f"density {densities[i]} keeps no entry of a {totals[i]}-entry model")
        selects[i].position = totals[i] - k
        selects[i].finish_pass()
        wanted.append(i)
    if wanted:
        for deltas in delta_stream():
            for i in wanted:
                selects[i].update(deltas[i].abs())
        for i in wanted:
            selects[i].finish_pass()
    return [float(selects[i].value) if i in wanted else 0.0 for i in range(n)]


# ---------------------------------------------------------------------------------------------- SCE select

# Entries per step of variance_select (each step stacks one chunk of every task vector).
_CHUNK = 2**20


def variance_select(deltas: list[Tensor], fraction: float) -> Tensor | None:
    """SCE's select step: which entries vary most across the task vectors (mergekit's ``sce_mask``).

    Each entry's variance across the models is ``torch.var(..., unbiased=False)`` of its values in the
    ``deltas``. Of the ``z`` entries whose variance is not zero, the ``k = int(z * fraction)`` largest are
    kept (``z * fraction`` in float32, as mergekit computes it, so ``k`` is mergekit's); among equal
    variances the lower flattened index wins.

    Args:
        deltas: the task vectors of one tensor, one per model, one shape; not modified.
        fraction: the fraction of the non-zero-variance entries to keep; ``>= 1`` keeps every entry,
            ``<= 0`` none.

    Returns:
        A bool mask of the deltas' shape (True: kept), or None when ``fraction >= 1`` (everything kept).
    """
    if fraction >= 1:
        return None
    shape, n = deltas[0].shape, deltas[0].numel()
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=deltas[0].device)
    flats = [d.reshape(-1) for d in deltas]
    variance = torch.empty(n, dtype=deltas[0].dtype, device=deltas[0].device)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        torch.var(torch.stack([f[part] for f in flats]), dim=0, unbiased=False, out=variance[part])
    nonzero = torch.count_nonzero(variance).cpu()
    # mergekit's int(count * density): an int64 tensor times a float is a float32 product.
    k = int(nonzero * fraction)
    return _largest_mask(variance, k).view(shape)
