"""The rank measures of one matrix, on matrices whose singular values are known."""

import math

import numpy as np
import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.inspect import effective_rank, energy_rank, singular_values, stable_rank


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
