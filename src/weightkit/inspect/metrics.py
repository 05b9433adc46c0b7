"""One row of the inspect report per weight matrix: the per-matrix metrics of issue 15, item 1.

:func:`matrix_metrics` is the single place that turns one 2-D weight into the report's numbers; the
report (:mod:`weightkit.inspect.report`) streams a checkpoint's tensors through it. Its keys are the
column names of ``weightkit inspect --json`` and of the CSV/DataFrame.
"""

from torch import Tensor

from weightkit.inspect.spectral import effective_rank, energy_rank, stable_rank

__all__ = ["matrix_metrics"]


def matrix_metrics(weight: Tensor) -> dict[str, float | int | str]:
    """The per-matrix metrics of a 2-D ``weight``, by column name."""
    return {
        "stable_rank": stable_rank(weight),
        "effective_rank": effective_rank(weight),
        "rank_90": energy_rank(weight, 0.90),
        "rank_99": energy_rank(weight, 0.99),
    }
