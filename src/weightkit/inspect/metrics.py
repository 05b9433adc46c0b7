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
  (:mod:`weightkit.inspect.welore`, the paper's defaults);
- ``svd``: ``"full"``, or ``"randomized (k=...)"`` for a matrix whose smaller side exceeds
  :data:`~weightkit.inspect.spectral.MAX_FULL_RANK`.

With a randomized spectrum, what needs every singular value is unknown and is ``None`` rather than a guess:
``effective_rank`` and the WeLore columns always, ``rank_90``/``rank_99`` when the top values do not hold
that share of the energy, ``mp_outliers`` when every computed value is an outlier (the count could be
higher). The power-law fit then searches ``xmin`` among the top eigenvalues only (see heavy_tail).

Speed against weightwatcher 0.7.7's ``analyze()`` (bench/inspect_peer.py in bench/.venv-weightwatcher;
weightkit timed over the same checkpoint read tensor by tensor with ``CheckpointReader``, reading included;
2-core CPU shared with other jobs, so the numbers move by ~20%):

====================================  ==========  ===============  =========  ===============
model                                 threads     weightwatcher    weightkit  peak RSS (ww/wk)
====================================  ==========  ===============  =========  ===============
bundled MiniLM (39 matrices)          1           5.85 s           0.83 s     803 / 399 MB
bundled MiniLM                        2           2.11 s           0.47 s     797 / 398 MB
random-init 162M Llama (86 matrices)  1           20.8 s           7.8 s      1665 / 563 MB
random-init 162M Llama                2           18.9 s           4.3 s      1668 / 537 MB
====================================  ==========  ===============  =========  ===============

On the Llama shapes (one thread) 88% of weightkit's time is the spectrum, i.e. the float32 Gram products
and ``eigvalsh`` (spectral's docstring has the per-layer numbers), 5% the power-law fit, 3% the
generalized-Gaussian sums, 3% reading. The ≥5x target is met on MiniLM with one thread (7x) but not on the
Llama shapes (2.7x to 4.4x): there weightwatcher's own time is almost all SciPy's SVD, and the Gram route
is only 2.2x (square) to 3.4x (3072 x 768) faster than it per matrix.
"""

import math

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.inspect.heavy_tail import fit_power_law, generalized_gaussian_fit, mp_outliers
from weightkit.inspect.spectral import (
    MAX_FULL_RANK,
    effective_rank_from_singular_values,
    energy_rank_from_singular_values,
    spectrum,
    stable_rank_from_singular_values,
)
from weightkit.inspect.welore import welore_label, welore_rank

__all__ = ["matrix_metrics"]


def matrix_metrics(
    weight: Tensor, *, device: torch.device | str | None = None, max_full_rank: int = MAX_FULL_RANK
) -> dict[str, float | int | str | None]:
    """The per-matrix metrics of a 2-D ``weight``, by column name (module docstring).

    Args:
        weight: the matrix, any float dtype (float64 is computed in float64, others in float32).
        device: where to compute; ``None`` computes where ``weight`` is.
        max_full_rank: largest smaller side decomposed in full; larger matrices get a randomized SVD.

    Raises:
        WeightkitError: ``weight`` is not floating point (e.g. a ``position_ids`` buffer) or not 2-D (e.g.
            a bias or a norm's scale; the report skips it with this message), is empty, holds NaN/Inf, or
            is all zeros.
    """
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
    return {
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
