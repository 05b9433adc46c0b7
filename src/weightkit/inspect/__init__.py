"""What a model's weights look like, and what a change did to them (``weightkit.inspect``).

``weightkit.inspect(path)`` (:func:`~weightkit.inspect.report.inspect_checkpoint`) streams a checkpoint one
tensor at a time and returns one row of metrics per weight matrix; ``write_report`` turns it into JSON, CSV,
PNG plots and one offline HTML page; ``weightkit inspect MODEL -o DIR`` does both from the shell.

The parts, each usable alone:

- per-matrix spectra (:mod:`.spectral`, :mod:`.heavy_tail`, :mod:`.metrics`): stable and
  effective rank, energy ranks, weightwatcher's power-law fit, Marchenko-Pastur outliers, the
  generalized-Gaussian fit, WeLore's rank reduction and LRC label, randomized SVD for huge matrices;
- comparing checkpoints (:mod:`.compare`: :mod:`.change`, :mod:`.quant_error`, :mod:`.adapter`,
  :mod:`.task_vectors`);
- layer similarity on data and weights (:mod:`.similarity`; imported on first use, it needs transformers);
- curvature and loss barriers (:mod:`.hessian`) and the intrinsic-dimension search (:mod:`.intrinsic`).
"""

from importlib import import_module

from weightkit import _callable_package
from weightkit.inspect.compare import (
    Table,
    adapter_metrics,
    compare,
    compare_checkpoints,
    quantization_error,
    task_vector_agreement,
)
from weightkit.inspect.heavy_tail import (
    GeneralizedGaussianFit,
    PowerLawFit,
    fit_power_law,
    generalized_gaussian_fit,
    marchenko_pastur_threshold,
    mp_outliers,
    powerlaw_alpha,
    powerlaw_fit,
)
from weightkit.inspect.hessian import hessian_density, hessian_eigenvalues, lanczos, loss_barrier, slq_density
from weightkit.inspect.intrinsic import IntrinsicDimension, d90_bisect, d90_sweep
from weightkit.inspect.metrics import matrix_metrics
from weightkit.inspect.report import InspectResult, inspect_checkpoint, write_report
from weightkit.inspect.spectral import (
    effective_rank,
    energy_rank,
    randomized_singular_values,
    singular_values,
    spectrum,
    stable_rank,
)
from weightkit.linalg import welore_label, welore_rank

inspect = inspect_checkpoint  # ``weightkit.inspect(path)``, as ``weightkit.merge(...)`` is merge's

# Layer similarity runs models: its module imports transformers, which the rest of inspect does not need.
_SIMILARITY = (
    "linear_cka",
    "mean_token_cosine",
    "ActivationSimilarity",
    "activation_similarity",
    "layer_similarity",
    "weight_similarity",
    "redundant_blocks",
)

__all__ = [
    "inspect",
    "inspect_checkpoint",
    "InspectResult",
    "write_report",
    "matrix_metrics",
    "singular_values",
    "randomized_singular_values",
    "spectrum",
    "stable_rank",
    "effective_rank",
    "energy_rank",
    "PowerLawFit",
    "fit_power_law",
    "powerlaw_fit",
    "powerlaw_alpha",
    "marchenko_pastur_threshold",
    "mp_outliers",
    "GeneralizedGaussianFit",
    "generalized_gaussian_fit",
    "welore_rank",
    "welore_label",
    "compare",
    "Table",
    "compare_checkpoints",
    "quantization_error",
    "adapter_metrics",
    "task_vector_agreement",
    "lanczos",
    "slq_density",
    "hessian_eigenvalues",
    "hessian_density",
    "loss_barrier",
    "IntrinsicDimension",
    "d90_sweep",
    "d90_bisect",
    *_SIMILARITY,
]


def __getattr__(name: str):
    if name in _SIMILARITY:
        return getattr(import_module("weightkit.inspect.similarity"), name)
    raise AttributeError(f"module 'weightkit.inspect' has no attribute {name!r}")


_callable_package(__name__, inspect_checkpoint)
