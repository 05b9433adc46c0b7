"""One row of the inspect report per weight matrix: the per-matrix metrics of issue 15, items 1 and 2.

:func:`matrix_metrics` is the single place that turns one 2-D weight into the report's numbers; the
report (:mod:`weightkit.inspect.report`) streams a checkpoint's tensors through it. Its keys are the
column names of ``weightkit inspect --json`` and of the CSV/DataFrame. Every number is read from one
spectrum (:func:`weightkit.inspect.spectral.spectrum`) plus one pass over the entries for the norms and the
generalized-Gaussian fit.

Columns:

- ``stable_rank``, ``effective_rank``, ``rank_90``, ``rank_99`` (:mod:`weightkit.inspect.spectral`);
- ``alpha``, ``alpha_weighted``, ``xmin``, ``ks_distance``: the power-law fit of weightwatcher 0.7.7
  (:mod:`weightkit.inspect.heavy_tail`); ``None`` when the matrix has fewer than 8 eigenvalues above
  1e-5 (weightwatcher skips such layers);
- ``spectral_norm`` (``sigma_max``; weightwatcher's own ``spectral_norm`` column is ``sigma_max^2``) and
  ``frobenius_norm``;
- ``mp_outliers``: eigenvalues above the Marchenko-Pastur bulk edge;
- ``gg_shape``, ``gg_scale``: the generalized-Gaussian fit of the entries;
- ``welore_ratio``, ``welore_label``: WeLore's rank reduction ratio and LRC / N-LRC label
  (:mod:`weightkit.linalg`, the paper's defaults);
- ``svd``: ``"full"``, or ``"randomized (k=...)"`` for a matrix whose smaller side exceeds
  :data:`~weightkit.inspect.spectral.MAX_FULL_RANK`.

With a randomized spectrum, what needs every singular value is unknown and is ``None`` rather than a guess:
``effective_rank`` and the WeLore columns always, ``rank_90``/``rank_99`` when the top values do not hold
that share of the energy, ``mp_outliers`` when every computed value is an outlier (the count could be
higher). The power-law fit then searches ``xmin`` among the top eigenvalues only (see heavy_tail).

Speed and agreement with weightwatcher 0.7.7 are measured by ``bench/inspect_bench.py`` (results in
``bench/results/inspect.json``, tabled in the README): most of the time is the spectrum (the float32 Gram
product and ``eigvalsh``), a few percent the power-law fit and the generalized-Gaussian sums.
"""

import math

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.inspect.heavy_tail import fit_power_law, generalized_gaussian_fit, mp_outliers
from weightkit.inspect.spectral import (
    MAX_FULL_RANK,
    Spectrum,
    as_tensor,
    effective_rank_from_singular_values,
    energy_rank_from_singular_values,
    spectrum,
    stable_rank_from_singular_values,
)
from weightkit.linalg import welore_label, welore_rank

__all__ = ["matrix_metrics", "matrix_metrics_with_spectrum"]


def matrix_metrics(
    weight: Tensor, *, device: torch.device | str | None = None, max_full_rank: int = MAX_FULL_RANK
) -> dict[str, float | int | str | None]:
    """The per-matrix metrics of a 2-D ``weight``, by column name (module docstring).

    Same arguments and errors as :func:`matrix_metrics_with_spectrum`, which also returns the spectrum.
    """
    return matrix_metrics_with_spectrum(weight, device=device, max_full_rank=max_full_rank)[0]


def matrix_metrics_with_spectrum(
    weight: Tensor, *, device: torch.device | str | None = None, max_full_rank: int = MAX_FULL_RANK
) -> tuple[dict[str, float | int | str | None], Spectrum]:
    """The per-matrix metrics of a 2-D ``weight`` and the spectrum they were read from (for its plot).

    Args:
        weight: the matrix, any float dtype (float64 is computed in float64, others in float32).
        device: where to compute; ``None`` computes where ``weight`` is.
        max_full_rank: largest smaller side decomposed in full; larger matrices get a randomized SVD.

    Raises:
        WeightkitError: ``weight`` is not floating point (e.g. a ``position_ids`` buffer) or not 2-D (e.g.
            a bias or a norm's scale; the report skips it with this message), is empty, holds NaN/Inf, or
            is all zeros.
    """
    weight = as_tensor(weight)
    if not weight.dtype.is_floating_point:
        raise WeightkitError(
            f"a {weight.dtype} tensor holds indices or counts, not weights: it has no spectrum"
        )
    if device is not None:
        weight = weight.to(device)
    spec = spectrum(weight, max_full_rank=max_full_rank)
    values = spec.values
    fit = fit_power_law(values.square())
    gg = generalized_gaussian_fit(weight)
    outliers = mp_outliers(values, spec.shape, spec.frobenius_sq)
    welore = welore_rank(values) if spec.complete else None
    metrics = {
        "stable_rank": stable_rank_from_singular_values(values, spec.frobenius_sq),
        "effective_rank": effective_rank_from_singular_values(values) if spec.complete else None,
        "rank_90": energy_rank_from_singular_values(values, 0.90, spec.frobenius_sq),
        "rank_99": energy_rank_from_singular_values(values, 0.99, spec.frobenius_sq),
        "alpha": fit.alpha if fit else None,
        "alpha_weighted": fit.alpha_weighted if fit else None,
        "xmin": fit.xmin if fit else None,
        "ks_distance": fit.ks_distance if fit else None,
        "spectral_norm": float(values[0]),
        "frobenius_norm": math.sqrt(spec.frobenius_sq),
        "mp_outliers": None if not spec.complete and outliers == len(values) else outliers,
        "gg_shape": gg.shape,
        "gg_scale": gg.scale,
        "welore_ratio": welore.ratio if welore else None,
        "welore_label": welore_label(welore.ratio) if welore else None,
        "svd": spec.method,
    }
    return metrics, spec
