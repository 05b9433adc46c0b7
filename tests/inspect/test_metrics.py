"""matrix_metrics: one spectrum per matrix, every column consistent with the pure functions, known answers on
planted matrices, weightwatcher's alphas on the real bundled MiniLM, refusals the report turns into skips."""

import math

import pytest
import torch

from weightkit.checkpoint import CheckpointReader
from weightkit.errors import WeightkitError
from weightkit.inspect.heavy_tail import generalized_gaussian_fit, powerlaw_fit
from weightkit.inspect.metrics import matrix_metrics
from weightkit.inspect.spectral import stable_rank
from weightkit.linalg import welore_rank
from weightkit.models import default_model_path

COLUMNS = {
    "stable_rank", "effective_rank", "rank_90", "rank_99", "alpha", "alpha_weighted", "xmin", "ks_distance",
    "spectral_norm", "frobenius_norm", "mp_outliers", "gg_shape", "gg_scale", "welore_ratio", "welore_label",
    "svd",
}  # fmt: skip


def _planted(rows: int, cols: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=generator, dtype=torch.float64))
    return left @ torch.diag(values) @ right.T


@pytest.mark.parametrize("k", [1, 5, 12])
def test_a_rank_k_matrix_has_effective_and_stable_rank_k(k):
    metrics = matrix_metrics(_planted(80, 40, torch.full((k,), 2.0, dtype=torch.float64), seed=k))
    assert set(metrics) == COLUMNS
    assert metrics["stable_rank"] == pytest.approx(k)
    # Zero singular values come out of the float64 Gram matrix as a ~1e-8 noise floor (spectral docstring).
    assert metrics["effective_rank"] == pytest.approx(k, rel=1e-4)
    assert metrics["rank_90"] == math.ceil(0.9 * k) and metrics["rank_99"] == math.ceil(0.99 * k)
    assert metrics["spectral_norm"] == pytest.approx(2.0)
    assert metrics["frobenius_norm"] == pytest.approx(2 * math.sqrt(k))


def test_every_column_agrees_with_its_pure_function():
    weight = torch.randn(120, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    metrics = matrix_metrics(weight, device="cpu")
    values = torch.linalg.svdvals(weight)
    fit = powerlaw_fit(weight)
    gg = generalized_gaussian_fit(weight)
    welore = welore_rank(values)
    assert metrics["alpha"] == pytest.approx(fit.alpha) and metrics["xmin"] == pytest.approx(fit.xmin)
    assert metrics["ks_distance"] == pytest.approx(fit.ks_distance)
    assert metrics["alpha_weighted"] == pytest.approx(fit.alpha * math.log10(float(values[0]) ** 2))
    assert metrics["spectral_norm"] == pytest.approx(float(values[0]))
    assert metrics["frobenius_norm"] == pytest.approx(float(torch.linalg.matrix_norm(weight)))
    assert (metrics["gg_shape"], metrics["gg_scale"]) == pytest.approx((gg.shape, gg.scale))
    assert metrics["welore_ratio"] == pytest.approx(welore.ratio)
    assert metrics["welore_label"] in ("LRC", "N-LRC") and metrics["svd"] == "full"


def test_a_huge_matrix_gets_a_randomized_svd_and_leaves_unknowns_empty():
    values = 10 * (torch.arange(1, 301, dtype=torch.float64)) ** -1.0
    weight = _planted(600, 300, values, seed=1)
    metrics = matrix_metrics(weight, max_full_rank=64)
    assert metrics["svd"] == "randomized (k=256)"
    assert (
        metrics["effective_rank"] is None
        and metrics["welore_ratio"] is None
        and metrics["welore_label"] is None
    )
    full = matrix_metrics(weight)
    # Exact from the top values and the entries' Frobenius norm:
    for column in ("stable_rank", "spectral_norm", "frobenius_norm", "rank_90", "mp_outliers", "gg_shape"):
        assert metrics[column] == pytest.approx(full[column], rel=1e-3), column


@pytest.mark.parametrize(
    ("name", "alpha", "xmin", "alpha_weighted"),
    [
        (
            "encoder.layer.0.attention.self.query.weight",
            2.4597221182382403,
            5.298807253303764,
            3.872121078384426,
        ),
        ("encoder.layer.5.intermediate.dense.weight", 3.508847280335749, 9.398453245945394, 6.11484049285813),
    ],
)
def test_alphas_on_the_real_minilm_equal_weightwatchers(name, alpha, xmin, alpha_weighted):
    # Recorded with bench/inspect_peer.py (weightwatcher 0.7.7, analyze() defaults) on the bundled MiniLM.
    weight = CheckpointReader(default_model_path()).get(name)
    assert weight.dtype == torch.float32
    metrics = matrix_metrics(weight)  # float32, as stored: agreement to float32 round-off
    assert metrics["alpha"] == pytest.approx(alpha, abs=1e-4)
    assert metrics["xmin"] == pytest.approx(xmin, rel=1e-5)
    assert metrics["alpha_weighted"] == pytest.approx(alpha_weighted, abs=1e-4)
    exact = matrix_metrics(weight.double())  # float64: weightwatcher's own precision
    assert exact["alpha"] == pytest.approx(alpha, rel=1e-10)


def test_a_matrix_with_too_few_eigenvalues_has_no_fit_but_its_other_metrics():
    metrics = matrix_metrics(torch.randn(2, 384, generator=torch.Generator().manual_seed(0)))
    assert metrics["alpha"] is None and metrics["xmin"] is None and metrics["ks_distance"] is None
    assert metrics["stable_rank"] >= 1 and metrics["svd"] == "full"


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.ones(384), "2-D"),
        (torch.ones(2, 3, 4), "2-D"),
        (torch.arange(512).reshape(1, 512), "not weights"),
        (torch.zeros(4, 4), "all zeros"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "NaN or Inf"),
    ],
)
def test_what_is_not_a_weight_matrix_is_refused_by_name(tensor, message):
    with pytest.raises(WeightkitError, match=message):
        matrix_metrics(tensor)


def test_numpy_arrays_and_lists_are_taken_as_tensors():
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    from_numpy = matrix_metrics(weight.numpy())
    assert from_numpy == matrix_metrics(weight)
    assert stable_rank(weight.tolist()) == pytest.approx(stable_rank(weight.double()))
