"""The spectrum of one matrix (full, float32, randomized) and its rank measures, on matrices whose singular
values are known."""

import math

import numpy as np
import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.inspect import effective_rank, energy_rank, singular_values, stable_rank
from weightkit.inspect.spectral import (
    energy_rank_from_singular_values,
    entry_sums,
    randomized_singular_values,
    spectrum,
)


def _orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


def test_a_scaled_orthogonal_matrix_has_full_rank_by_every_measure():
    weight = 3.0 * _orthogonal(10)
    assert stable_rank(weight) == pytest.approx(10)
    assert effective_rank(weight) == pytest.approx(10)
    assert energy_rank(weight, 0.9) == 9 and energy_rank(weight, 1.0) == 10


def test_a_rank_one_matrix_has_rank_one_by_every_measure():
    weight = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 5.0))
    assert stable_rank(weight) == pytest.approx(1)
    assert effective_rank(weight) == pytest.approx(1)
    assert energy_rank(weight, 0.99) == 1


def test_known_singular_values_give_the_defining_formulas():
    # Singular values 4, 3, 0 (rotated so the matrix is not diagonal).
    weight = (
        _orthogonal(3, 1) @ torch.diag(torch.tensor([4.0, 3.0, 0.0], dtype=torch.float64)) @ _orthogonal(3, 2)
    )
    torch.testing.assert_close(singular_values(weight), torch.tensor([4.0, 3.0, 0.0], dtype=torch.float64))
    assert stable_rank(weight) == pytest.approx(25 / 16)
    p = np.array([4 / 7, 3 / 7])
    assert effective_rank(weight) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert energy_rank(weight, 0.64) == 1 and energy_rank(weight, 0.65) == 2  # 16 of 25 is 0.64


def test_on_a_random_matrix_the_measures_agree_with_numpy_and_stay_within_bounds():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    s = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(weight) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert stable_rank(weight) == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert 1 <= stable_rank(weight) <= 32 and 1 <= effective_rank(weight) <= 32


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.zeros(4, 4), "all zeros"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN or Inf"),
        (torch.ones(4), "2-D"),
    ],
)
def test_matrices_without_a_rank_are_refused(weight, message):
    with pytest.raises(WeightkitError, match=message):
        effective_rank(weight)


def test_a_fraction_outside_0_1_is_refused():
    for fraction in (0, 1.5):
        with pytest.raises(WeightkitError, match="fraction"):
            energy_rank(torch.eye(3), fraction)


def _planted(rows: int, cols: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    """A ``rows x cols`` matrix with exactly these singular values (random orthonormal bases)."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=generator, dtype=torch.float64))
    return left @ torch.diag(values) @ right.T


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_the_gram_spectrum_equals_the_full_svd_in_float64(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    spec = spectrum(weight)
    torch.testing.assert_close(spec.values, torch.linalg.svdvals(weight), rtol=1e-10, atol=1e-12)
    assert spec.complete and spec.method == "full" and spec.shape == shape
    assert spec.frobenius_sq == pytest.approx(float(weight.square().sum()))


def test_a_float32_weight_gets_a_float32_spectrum_within_float32_accuracy():
    weight = torch.randn(96, 48, generator=torch.Generator().manual_seed(4))
    values = spectrum(weight).values
    assert values.dtype == torch.float64
    reference = torch.linalg.svdvals(weight.double())
    # Squaring in float32: relative error of sigma_i about eps32 * (sigma_max / sigma_i)^2.
    torch.testing.assert_close(values, reference, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    ("values", "tolerance"),
    [
        ((torch.arange(512, dtype=torch.float64) + 1) ** -0.5, 2e-3),  # slowly decaying
        (torch.cat([torch.linspace(20, 4, 20), torch.linspace(2, 0.1, 492)]).double(), 2e-2),  # tail + bulk
    ],
)
def test_the_randomized_svd_is_within_its_documented_error(values, tolerance):
    weight = _planted(1024, 512, values, seed=5)
    top = randomized_singular_values(weight, 64)
    relative = (top - values[:64]).abs() / values[:64]
    assert relative.max() < tolerance
    assert relative[:10].max() < 1e-3  # the leading values, which the spectral norm and outliers use
    torch.testing.assert_close(randomized_singular_values(weight, 64), top, rtol=0, atol=0)  # seeded


def test_a_matrix_above_the_full_rank_limit_gets_a_randomized_spectrum_and_says_so():
    values = 10 * (torch.arange(96, dtype=torch.float64) + 1) ** -1.0
    spec = spectrum(_planted(200, 96, values, seed=6), max_full_rank=64, randomized_rank=16)
    assert spec.method == "randomized (k=16)" and not spec.complete and len(spec.values) == 16
    assert spec.frobenius_sq == pytest.approx(float(values.square().sum()))  # exact, from the entries
    torch.testing.assert_close(spec.values, values[:16], rtol=1e-3, atol=0)
    # Energy ranks from the top values and the exact Frobenius norm: known when reached, else None.
    assert energy_rank_from_singular_values(spec.values, 0.5, spec.frobenius_sq) == 1  # 100 of 162.6
    assert energy_rank_from_singular_values(spec.values, 0.99, spec.frobenius_sq) is None


def test_the_randomized_svd_refuses_a_rank_outside_the_matrix():
    with pytest.raises(WeightkitError, match="k must be in"):
        randomized_singular_values(torch.eye(4), 5)


def test_entry_sums_accumulate_in_float64():
    # 3 million float32 entries; per-block float32 norms (sqrt then squared) leave ~1e-8 relative.
    tensor = torch.randn(3_000_001, generator=torch.Generator().manual_seed(8)).abs() + 1
    reference = tensor.double()
    sum_abs, sum_sq = entry_sums(tensor)
    assert sum_abs == pytest.approx(float(reference.sum()), rel=1e-7)
    assert sum_sq == pytest.approx(float(reference.square().sum()), rel=1e-7)
