"""The shape of a weight matrix's distributions: power-law tail of its spectrum, Marchenko-Pastur outliers,
generalized-Gaussian entries. Pure functions on tensors.

**Power law** (:func:`fit_power_law`, :func:`powerlaw_fit`, :func:`powerlaw_alpha`). The empirical spectral
density of the eigenvalues ``lambda_i = sigma_i^2`` of ``WᵀW`` is fitted above ``xmin`` by
``p(lambda) ~ lambda^-alpha`` with the estimator of Clauset, Shalizi and Newman, "Power-law distributions in
empirical data" (arXiv 0706.1062): for every candidate ``xmin`` the continuous maximum-likelihood exponent
``alpha = 1 + n / sum_{lambda_i >= xmin} log(lambda_i / xmin)`` over the ``n`` eigenvalues at or above it, and
the Kolmogorov-Smirnov distance ``D`` between their empirical CDF and the fitted one
``1 - (lambda / xmin)^(1 - alpha)``; the ``xmin`` with the smallest ``D`` wins.

It matches weightwatcher 0.7.7's ``analyze()`` with its defaults (read in its source,
``weightwatcher.py`` and ``WW_powerlaw.py``), so alphas agree layer by layer:

- eigenvalues: ``sigma^2`` of the weight as stored, in float64, *not* divided by ``N`` (its ``normalize``
  is off by default); every singular value, i.e. ``min(rows, cols)`` of them — a ``Linear`` of either
  orientation and an ``Embedding`` are one matrix with the same singular values (weightwatcher takes
  ``N = max``, ``M = min`` of the shape).
- only eigenvalues above ``1e-5`` enter the fit (its ``EVALS_THRESH``).
- its own fitter (``pl_package="ww"``, not the ``powerlaw`` package) with ``fix_fingers=False`` and no
  ``xmax``: the ``xmin`` candidates are every fitted eigenvalue but the largest, duplicates included; the
  empirical CDF at the ``j``-th eigenvalue of the tail is ``j / n`` (``j = 0..n-1``) and ``D`` the largest
  absolute gap to the fitted CDF at the eigenvalues; a candidate with ``alpha <= 1`` gets ``D = 1``; ties
  go to the smallest ``xmin``.
- below 20 fitted eigenvalues weightwatcher 0.7.7 switches to a small-sample variant: bias-corrected
  ``alpha = 1 + (n - 1) / sum log`` and only tails of at least 8 eigenvalues. (It also computes an
  objective ``D - 0.868 / sqrt(n)``, but its ``WWFit.__init__`` then picks ``xmin`` by the smallest ``D``
  as in the standard case, so the objective has no effect; this module does what it does.) Where every
  candidate is invalid (all eigenvalues equal) weightwatcher reports a degenerate fit; here ``None``.
- ``alpha_weighted = alpha * log10(lambda_max)``.
- weightwatcher skips a layer whose smaller side is under 8 (``min_evals``) or over 15000
  (``max_evals``), or whose larger side is over 50000 (``max_N``, e.g. a 128k-token embedding); here a
  matrix with fewer than 8 eigenvalues above the floor has no fit (``None``) and larger matrices are fitted
  anyway (weightwatcher has no row for them to compare with).

The search over ``xmin`` is vectorised: the alphas from a reverse cumulative sum of ``log lambda``, the KS
distances as one masked (candidate x eigenvalue) array, in blocks of rows to bound memory. weightwatcher
on a CPU computes float64 singular values of the weight (cast from float32);
:func:`weightkit.inspect.spectral.spectrum` does the same for a float64 weight (alphas then agree to
1e-12) but works in float32 for a float32/16-bit one, for speed. Measured |alpha - weightwatcher's alpha|
with float32 spectra: the bundled MiniLM (39 matrices) median 2.9e-6, worst 7.4e-5; a randomly initialised
162M Llama (hidden 768, intermediate 3072, 12 layers, vocabulary 32000, untied; 86 matrices) median 5.4e-5,
worst 0.011 (random-matrix spectra have a flat KS minimum, so float32 round-off can move ``xmin`` there).

With a truncated (randomized) spectrum the fit sees only the top eigenvalues, so ``xmin`` is searched among
them: exact when weightwatcher's ``xmin`` lies in that range (the tail of trained weights usually does),
otherwise a different, tail-only fit; :func:`weightkit.inspect.metrics.matrix_metrics` rows computed
this way say ``randomized (k=...)`` in their ``svd`` column.

**Marchenko-Pastur outliers** (:func:`mp_outliers`). For an ``N x M`` matrix (``N >= M``, aspect ratio
``q = M / N <= 1``) of i.i.d. entries of variance ``v``, the eigenvalues of the ``M x M`` Gram matrix lie
below the bulk edge ``lambda_+ = v (sqrt(N) + sqrt(M))^2`` as the sizes grow (Marchenko and Pastur 1967;
``v N (1 + sqrt(q))^2``). ``v`` is estimated as the mean squared entry ``||W||_F^2 / (N M)``, *not*
centred: a non-zero mean is itself a rank-one spike and should count. The finite-size fluctuation of the
largest eigenvalue of a white Wishart matrix is Tracy-Widom with, in Johnstone's centring and scaling
("On the distribution of the largest eigenvalue in principal components analysis", 2001),
``mu = (sqrt(N - 1) + sqrt(M))^2`` and ``s = (sqrt(N - 1) + sqrt(M)) (1/sqrt(N - 1) + 1/sqrt(M))^(1/3)``
(times ``v``). An eigenvalue counts as an outlier above ``v (mu + 4 s)``: 4 Tracy-Widom scales put the
false-alarm probability of a pure-noise matrix near 1e-4 (the TW1 upper tail), so a Gaussian matrix gives
0. A planted rank-one spike of strength ``s`` above the BBP threshold ``(N M)^(1/4)`` (Baik, Ben Arous,
Péché) appears at ``(s^2 + N)(s^2 + M) / s^2`` and is counted once that clears the margin; weaker spikes
stay in the bulk and are not. Since ``v`` includes the spikes' energy, the count is conservative on
matrices dominated by their spikes.

**Generalized Gaussian** (:func:`generalized_gaussian_fit`). "It Takes a Good Model to Train a Good Model:
Generalized Gaussian Priors for Optimized LLMs" (arXiv 2506.00486) models trained weights as
``p(w) ~ exp(-|w / scale|^shape)`` (Gaussian: shape 2; Laplace: 1). The fitting procedure is not stated in
the material available here (abstract and project summary), so this module uses the standard
moment-ratio estimator (Sharifi and Leon-Garcia, 1995): the shape solves
``(E|w|)^2 / E[w^2] = Gamma(2/shape)^2 / (Gamma(1/shape) Gamma(3/shape))`` (monotone in the shape, solved
by bracketing), then ``scale = sqrt(E[w^2] Gamma(1/shape) / Gamma(3/shape))``. It needs two sums over
the entries, where the maximum-likelihood fit iterates over all of them; the MLE is statistically more
efficient, but on the 160,000-entry samples of the tests the moment estimate is already within 3% of the
true shape (a weight matrix has millions of entries). Entries are not centred (the GG is centred at 0, as
weights are).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.inspect.spectral import as_tensor, entry_sums, spectrum

__all__ = [
    "PowerLawFit",
    "fit_power_law",
    "powerlaw_fit",
    "powerlaw_alpha",
    "marchenko_pastur_threshold",
    "mp_outliers",
    "GeneralizedGaussianFit",
    "generalized_gaussian_fit",
    "EIGENVALUE_FLOOR",
    "MIN_EIGENVALUES",
]

EIGENVALUE_FLOOR = 1e-5
"""Eigenvalues at or below this are left out of the power-law fit (weightwatcher's ``EVALS_THRESH``)."""

MIN_EIGENVALUES = 8
"""Fewest eigenvalues a fit is attempted on (weightwatcher's ``min_evals`` default)."""

_SMALL_SAMPLE = 20  # weightwatcher 0.7.7's SMALL_N_CUTOFF: below it, its small-sample estimator
_BLOCK_ELEMENTS = 1 << 22  # (candidate x eigenvalue) entries per block of the KS search: 32 MB of float64
_BLOCK_ROWS = 128  # candidates per block: the triangle's skipped part outweighs the per-block overhead
_TRACY_WIDOM_SCALES = 4.0


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit of the eigenvalue tail.

    Attributes:
        alpha: the exponent of ``p(lambda) ~ lambda^-alpha`` above ``xmin``.
        xmin: the eigenvalue where the tail starts.
        ks_distance: the Kolmogorov-Smirnov distance of the tail to the fit (weightwatcher's ``D``).
        tail_size: eigenvalues at or above ``xmin`` (weightwatcher's ``num_pl_spikes``).
        alpha_weighted: ``alpha * log10(lambda_max)``.
    """

    alpha: float
    xmin: float
    ks_distance: float
    tail_size: int
    alpha_weighted: float


def _ks_distances(log_values: Tensor, alphas: Tensor, valid: Tensor) -> Tensor:
    """KS distance of the tail starting at each candidate ``i`` (row) to its fit; 1 where not ``valid``."""
    count = log_values.numel()
    candidates = alphas.numel()
    device = log_values.device
    distances = torch.ones(candidates, dtype=torch.float64, device=device)
    # Blocks of candidates, each one vectorised computation over the eigenvalues from the block's first
    # candidate on: the (candidate x eigenvalue) array is triangular, so small blocks skip most of the
    # lower half and bound the memory for large spectra.
    rows_per_block = max(1, min(_BLOCK_ROWS, _BLOCK_ELEMENTS // count))
    for start in range(0, candidates, rows_per_block):
        rows = torch.arange(start, min(start + rows_per_block, candidates), device=device)
        offset = torch.arange(start, count, device=device)[None, :] - rows[:, None]  # j - i, the tail index
        log_ratio = (log_values[None, start:] - log_values[rows, None]).clamp_min(0)
        fitted_cdf = 1 - torch.exp((1 - alphas[rows, None]) * log_ratio)
        empirical_cdf = offset.to(torch.float64) / (count - rows).to(torch.float64)[:, None]
        gaps = torch.where(
            offset >= 0, (fitted_cdf - empirical_cdf).abs(), torch.zeros((), dtype=torch.float64)
        )
        distances[rows] = torch.where(valid[rows], gaps.amax(1), distances[rows])
    return distances


def fit_power_law(eigenvalues: Tensor) -> PowerLawFit | None:
    """Fit the tail of ``eigenvalues`` (any order, ``>= 0``) as weightwatcher 0.7.7 does (module docstring).

    Returns:
        The fit, or ``None`` when fewer than :data:`MIN_EIGENVALUES` eigenvalues exceed the floor (or, in
        the small-sample regime, no candidate tail is valid).
    """
    eigenvalues = eigenvalues.detach().to(torch.float64).flatten()
    lambda_max = float(eigenvalues.max())
    values = eigenvalues[eigenvalues > EIGENVALUE_FLOOR].sort().values
    count = values.numel()
    if count < MIN_EIGENVALUES:
        return None
    log_values = values.log()
    # Candidate i: xmin = values[i], tail values[i:], n_i = count - i, for i = 0 .. count - 2.
    tail_sizes = torch.arange(count, 1, -1, dtype=torch.float64, device=values.device)
    tail_log_sums = log_values.flip(0).cumsum(0).flip(0)[:-1]
    log_excess = tail_log_sums - tail_sizes * log_values[:-1]  # sum_{j >= i} log(values_j / values_i)
    if count >= _SMALL_SAMPLE:
        alphas = 1 + tail_sizes / log_excess
        valid = alphas > 1
    else:
        # weightwatcher 0.7.7's small-sample estimator: bias-corrected alpha, only tails of >= 8 eigenvalues.
        alphas = 1 + (tail_sizes - 1) / log_excess
        valid = (tail_sizes >= MIN_EIGENVALUES) & (log_excess > 1e-12) & (alphas > 1)
        if not valid.any():
            return None
    distances = _ks_distances(log_values, alphas, valid)
    best = int(distances.argmin())  # argmin returns the first minimum: ties go to the smallest xmin
    alpha = float(alphas[best])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(values[best]),
        ks_distance=float(distances[best]),
        tail_size=count - best,
        alpha_weighted=alpha * math.log10(lambda_max),
    )


def powerlaw_fit(weight: Tensor) -> PowerLawFit | None:
    """The power-law fit of the eigenvalues of ``WᵀW`` for a 2-D ``weight`` (module docstring)."""
    return fit_power_law(spectrum(weight).values.square())


def powerlaw_alpha(weight: Tensor) -> float:
    """weightwatcher's ``alpha`` of a 2-D ``weight``.

    Raises:
        WeightkitError: fewer than :data:`MIN_EIGENVALUES` eigenvalues above the floor.
    """
    fit = powerlaw_fit(weight)
    if fit is None:
        raise WeightkitError(
            f"a power-law fit needs at least {MIN_EIGENVALUES} eigenvalues above {EIGENVALUE_FLOOR}; "
            f"the matrix of shape {tuple(weight.shape)} has fewer"
        )
    return fit.alpha


def marchenko_pastur_threshold(shape: tuple[int, int], variance: float) -> float:
    """The eigenvalue of ``WᵀW`` above which a ``shape`` matrix of i.i.d. ``variance`` entries has an outlier.

    The bulk edge plus 4 Tracy-Widom scales (module docstring): ``variance * (mu + 4 s)``.
    """
    big, small = max(shape), min(shape)
    if small < 1 or variance <= 0:
        raise WeightkitError(
            f"the Marchenko-Pastur edge needs a non-empty shape and variance > 0; got {shape}"
        )
    root_big = math.sqrt(max(big - 1, 1))
    root_small = math.sqrt(small)
    centre = (root_big + root_small) ** 2
    scale = (root_big + root_small) * (1 / root_big + 1 / root_small) ** (1 / 3)
    return variance * (centre + _TRACY_WIDOM_SCALES * scale)


def mp_outliers(singular_values: Tensor, shape: tuple[int, int], frobenius_sq: float | None = None) -> int:
    """How many eigenvalues ``sigma_i^2`` lie above the Marchenko-Pastur bulk edge (module docstring).

    Args:
        singular_values: the matrix's singular values (all of them, or the top ones with ``frobenius_sq``).
        shape: the matrix's ``(rows, cols)``.
        frobenius_sq: ``||W||_F^2`` when ``singular_values`` is truncated; else their squared sum.
    """
    total = float(singular_values.square().sum()) if frobenius_sq is None else frobenius_sq
    threshold = marchenko_pastur_threshold(shape, total / (shape[0] * shape[1]))
    return int((singular_values.to(torch.float64).square() > threshold).sum())


@dataclass(frozen=True)
class GeneralizedGaussianFit:
    """``p(w) ~ exp(-|w / scale|^shape)``: ``shape`` 2 is Gaussian, 1 Laplace, below 1 heavier-tailed."""

    shape: float
    scale: float


def _moment_ratio(shape: float) -> float:
    """``(E|w|)^2 / E[w^2]`` of a generalized Gaussian of ``shape``."""
    return math.exp(2 * math.lgamma(2 / shape) - math.lgamma(1 / shape) - math.lgamma(3 / shape))


def _shape_for_ratio(ratio: float, low: float, high: float) -> float:
    """The shape whose moment ratio is ``ratio``, by bisection on ``log(shape)`` (the ratio increases with the
    shape): 64 halvings of ``log(high / low)`` leave far less than float64 rounding. Plain ``math``, not
    scipy's root finders, whose import alone took most of a second of ``weightkit inspect``'s start."""
    log_low, log_high = math.log(low), math.log(high)
    for _ in range(64):
        middle = (log_low + log_high) / 2
        if _moment_ratio(math.exp(middle)) < ratio:
            log_low = middle
        else:
            log_high = middle
    return math.exp((log_low + log_high) / 2)


_SHAPE_RANGE = (0.05, 50.0)  # the ratio spans (2.5e-5, 0.7495) over it: sparser or flatter than any weight


def generalized_gaussian_fit(weight: Tensor) -> GeneralizedGaussianFit:
    """The moment-ratio generalized-Gaussian fit of the entries of ``weight`` (module docstring).

    Raises:
        WeightkitError: ``weight`` holds NaN/Inf, is all zeros, or its ratio lies outside the shape range
            (0.05, 50) — e.g. a matrix whose entries take only two values of equal magnitude.
    """
    weight = as_tensor(weight)
    if weight.numel() == 0:
        raise WeightkitError("a generalized-Gaussian fit needs entries; the tensor is empty")
    sum_abs, sum_sq = entry_sums(weight)
    if not math.isfinite(sum_sq):  # a NaN or Inf entry (or squares beyond float range)
        raise WeightkitError("a generalized-Gaussian fit needs finite entries")
    mean_abs, mean_sq = sum_abs / weight.numel(), sum_sq / weight.numel()
    if mean_sq == 0:
        raise WeightkitError("the tensor is all zeros: it has no distribution shape")
    ratio = mean_abs**2 / mean_sq
    low, high = _SHAPE_RANGE
    if not _moment_ratio(low) < ratio < _moment_ratio(high):
        raise WeightkitError(
            f"the moment ratio (E|w|)^2/E[w^2] = {ratio:.6g} has no generalized-Gaussian shape "
            f"in {_SHAPE_RANGE}"
        )
    shape = _shape_for_ratio(ratio, low, high)
    scale = math.sqrt(mean_sq * math.exp(math.lgamma(1 / shape) - math.lgamma(3 / shape)))
    return GeneralizedGaussianFit(shape=shape, scale=scale)
