"""Power-law fit (against a brute-force reference and weightwatcher 0.7.7), Marchenko-Pastur outliers and the
generalized-Gaussian fit, on matrices and samples whose answer is known."""

import math

import numpy as np
import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.inspect.heavy_tail import (
    fit_power_law,
    generalized_gaussian_fit,
    marchenko_pastur_threshold,
    mp_outliers,
    powerlaw_alpha,
    powerlaw_fit,
)
from weightkit.inspect.spectral import spectrum


def _reference_fit(eigenvalues: np.ndarray) -> tuple[float, float, float]:
    """Clauset-Shalizi-Newman as weightwatcher's WWFit does it, one xmin at a time (>= 20 values)."""
    data = np.sort(eigenvalues[eigenvalues > 1e-5])
    best = (math.inf, math.nan, math.nan)
    for i in range(len(data) - 1):
        tail = data[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / data[i]))
        distance = 1.0
        if alpha > 1:
            distance = np.max(np.abs(1 - (tail / data[i]) ** (1 - alpha) - np.arange(n) / n))
        if distance < best[0]:
            best = (distance, alpha, data[i])
    return best[1], best[2], best[0]


def _student_t(rows: int, cols: int, seed: int) -> np.ndarray:
    # The fixed matrices the weightwatcher values below were recorded on (NumPy's PCG64 stream).
    return np.random.default_rng(seed).standard_t(3, size=(rows, cols)).astype(np.float32)


def test_the_vectorised_fit_equals_a_brute_force_loop_over_xmin():
    weight = torch.from_numpy(_student_t(300, 100, 0)).double()
    eigenvalues = np.linalg.svd(weight.numpy(), compute_uv=False) ** 2
    alpha, xmin, distance = _reference_fit(eigenvalues)
    fit = powerlaw_fit(weight)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == pytest.approx(xmin, rel=1e-12)
    assert fit.ks_distance == pytest.approx(distance, rel=1e-9)
    assert fit.alpha_weighted == pytest.approx(alpha * math.log10(eigenvalues.max()), rel=1e-12)
    assert fit.tail_size == int((eigenvalues >= xmin).sum())


def test_alpha_equals_weightwatcher_0_7_7_on_fixed_matrices():
    # Recorded with bench/.venv-weightwatcher (bash bench/peer_env.sh weightwatcher): each matrix set as the
    # weight of a torch.nn.Linear(cols, rows, bias=False) and `weightwatcher.WeightWatcher(model).analyze()`
    # run with its defaults; alpha, xmin, D, alpha_weighted and num_pl_spikes of its row.
    rng = np.random.default_rng(0)
    large = torch.from_numpy(rng.standard_t(3, size=(300, 100)).astype(np.float32))
    small = torch.from_numpy(
        rng.standard_t(3, size=(12, 40)).astype(np.float32)
    )  # 12 eigenvalues: small-N fit
    fit = powerlaw_fit(large.double())
    assert fit.alpha == pytest.approx(6.389214770108142, rel=1e-10)
    assert fit.xmin == pytest.approx(1626.7822797437404, rel=1e-10)
    assert fit.ks_distance == pytest.approx(0.07185226186485871, rel=1e-10)
    assert fit.alpha_weighted == pytest.approx(22.817872518131125, rel=1e-10)
    assert fit.tail_size == 12
    small_fit = powerlaw_fit(small.double())
    assert small_fit.alpha == pytest.approx(2.1218307855041294, rel=1e-10)
    assert small_fit.xmin == pytest.approx(40.35084666916996, rel=1e-10)
    assert small_fit.ks_distance == pytest.approx(0.16309909464433953, rel=1e-10)
    assert small_fit.tail_size == 10
    # In float32 (how a stored checkpoint is analysed) the same fit within float32 round-off.
    assert powerlaw_alpha(large) == pytest.approx(6.389214770108142, abs=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_a_planted_power_law_is_recovered(seed):
    # 2000 eigenvalues from a Pareto density p(x) ~ x^-2.5 on [1, inf): inverse-CDF sampling.
    uniform = torch.rand(2000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    eigenvalues = (1 - uniform) ** (-1 / 1.5)
    fit = fit_power_law(eigenvalues)
    # The MLE's standard error is (alpha - 1) / sqrt(n) = 0.034 at n = 2000; the xmin search trims the tail
    # (to >= 1200 values on these seeds), hence 0.15.
    assert fit.alpha == pytest.approx(2.5, abs=0.15)
    assert fit.ks_distance < 0.05


@pytest.mark.parametrize("seed", range(5))
def test_a_gaussian_random_matrix_has_no_outliers_and_a_random_alpha(seed):
    weight = torch.randn(600, 300, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spec = spectrum(weight)
    assert mp_outliers(spec.values, spec.shape) == 0
    # Marchenko-Pastur spectra have no heavy tail: weightwatcher reads alpha > 6 as "random-like".
    assert fit_power_law(spec.values.square()).alpha > 6


@pytest.mark.parametrize("seed", range(3))
def test_planted_spikes_above_the_edge_are_counted(seed):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(600, 300, generator=generator, dtype=torch.float64)
    left, _ = torch.linalg.qr(torch.randn(600, 3, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(300, 3, generator=generator, dtype=torch.float64))
    # Bulk singular values reach sqrt(600) + sqrt(300) = 41.8; BBP: a spike s > (600 * 300) ** 0.25 = 20.6
    # detaches to about sqrt((s^2 + 600)(s^2 + 300)) / s. These three land at 52, 64 and 88.
    spikes = torch.tensor([40.0, 55.0, 80.0], dtype=torch.float64)
    weight = noise + left @ torch.diag(spikes) @ right.T
    spec = spectrum(weight)
    assert mp_outliers(spec.values, spec.shape) == 3


def test_the_edge_is_the_marchenko_pastur_edge_plus_a_tracy_widom_margin():
    # 600 x 300, unit variance: mu = (sqrt(599) + sqrt(300))^2, s = (sqrt(599) + sqrt(300)) (1/sqrt(599) +
    # 1/sqrt(300))^(1/3).
    root_big, root_small = math.sqrt(599), math.sqrt(300)
    expected = (root_big + root_small) ** 2 + 4 * (root_big + root_small) * (
        1 / root_big + 1 / root_small
    ) ** (1 / 3)
    assert marchenko_pastur_threshold((600, 300), 1.0) == pytest.approx(expected)
    assert marchenko_pastur_threshold((300, 600), 2.0) == pytest.approx(2 * expected)  # either orientation


@pytest.mark.parametrize(
    ("sample", "shape", "scale"),
    [
        (lambda g: torch.randn(400, 400, generator=g, dtype=torch.float64), 2.0, math.sqrt(2)),
        # Laplace(0, 1) by inverse CDF: scale 1, shape 1.
        (
            lambda g: (
                -torch.sign(u := torch.rand(400, 400, generator=g, dtype=torch.float64) - 0.5)
                * torch.log1p(-2 * u.abs())
            ),
            1.0,
            1.0,
        ),
    ],
    ids=["gaussian", "laplace"],
)
def test_the_generalized_gaussian_fit_recovers_gaussian_and_laplace(sample, shape, scale):
    for seed in range(3):
        fit = generalized_gaussian_fit(sample(torch.Generator().manual_seed(seed)))
        assert fit.shape == pytest.approx(shape, rel=0.03)
        assert fit.scale == pytest.approx(scale, rel=0.02)


def test_fits_without_data_are_refused_or_empty():
    assert fit_power_law(torch.tensor([1.0, 2.0, 3.0])) is None  # fewer than 8 eigenvalues
    with pytest.raises(WeightkitError, match="at least 8 eigenvalues"):
        powerlaw_alpha(torch.randn(4, 100))
    with pytest.raises(WeightkitError, match="all zeros"):
        generalized_gaussian_fit(torch.zeros(3, 3))
    with pytest.raises(WeightkitError, match="no generalized-Gaussian shape"):
        generalized_gaussian_fit(torch.tensor([1.0, -1.0, 1.0, -1.0]))  # two values: the ratio is 1
