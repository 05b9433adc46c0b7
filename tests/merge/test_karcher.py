"""Tests for weightkit.merge.karcher against mergekit's iteration in Python floats, and the mean's defining
property (the logarithm maps of the points sum to zero at the mean)."""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.karcher import KarcherConfig, karcher_mean
from weightkit.registry import config_from_dict


def _dot(x, y):
    return math.fsum(a * b for a, b in zip(x, y, strict=True))


def karcher_reference(tensors, max_iter=10, tol=1e-5):
    """mergekit's karcher_merge_tensors with equal weights, on lists of Python floats."""
    vs = [t.reshape(-1).tolist() for t in tensors]
    norms = [math.sqrt(_dot(v, v)) for v in vs]
    units = [[x / n for x in v] for v, n in zip(vs, norms, strict=True) if n > tol]
    if not units:
        return torch.zeros(tensors[0].shape, dtype=torch.float64)
    k = len(units)
    mean = [sum(u[i] for u in units) / k for i in range(len(vs[0]))]
    mean_norm = math.sqrt(_dot(mean, mean))
    mean = list(units[0]) if mean_norm < tol else [m / mean_norm for m in mean]
    for _ in range(max_iter):
        tangent = [0.0] * len(mean)
        for u in units:
            d = min(max(_dot(mean, u), -1.0), 1.0)
            theta = math.acos(d)
            if theta < tol:
                continue
            c = theta / math.sin(theta) / k
            tangent = [g + c * (x - d * m) for g, x, m in zip(tangent, u, mean, strict=True)]
        step = math.sqrt(_dot(tangent, tangent))
        if step < tol:
            break
        mean = [math.cos(step) * m + math.sin(step) * g / step for m, g in zip(mean, tangent, strict=True)]
        norm = math.sqrt(_dot(mean, mean))
        if norm > tol:
            mean = [m / norm for m in mean]
    scale = sum(norms) / len(tensors)
    return torch.tensor([scale * m for m in mean], dtype=torch.float64).reshape(tensors[0].shape)


def spread(seed, n=3, shape=(6, 5), noise=0.6):
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(shape, generator=g)
    return [(center + noise * torch.randn(shape, generator=g)) * (1 + i) for i in range(n)]


@pytest.mark.parametrize("max_iter", [0, 1, 10])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_matches_reference(n, max_iter):
    tensors = spread(n, n)
    expected = karcher_reference(tensors, max_iter=max_iter)
    got = karcher_mean([t.clone() for t in tensors], max_iter=max_iter)
    assert got.shape == tensors[0].shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_logarithm_maps_of_the_points_sum_to_zero_at_the_mean():
    tensors = spread(7, 4, noise=1.0)
    mean = karcher_mean([t.clone() for t in tensors], max_iter=100, tol=1e-9).double().reshape(-1)
    m = mean / mean.norm()
    gradient = torch.zeros_like(m)
    for t in tensors:
        u = t.double().reshape(-1) / t.double().norm()
        theta = math.acos(float(m @ u))
        gradient += theta / math.sin(theta) * (u - (m @ u) * m)
    assert float(gradient.norm()) < 1e-5
    # ... which the normalised Euclidean mean of the directions (no iteration) is not.
    start = karcher_mean([t.clone() for t in tensors], max_iter=0).double().reshape(-1)
    assert float((start / start.norm() - m).norm()) > 1e-4


def test_two_points_meet_half_way_along_the_great_circle_at_their_mean_norm():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 3.0, 0.0])
    got = karcher_mean([a.clone(), b.clone()])
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2) * 2.0)


def test_identical_tensors_give_that_tensor():
    t = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(karcher_mean([t.clone() for _ in range(3)]), t)


def test_a_zero_tensor_counts_in_the_norm_only_and_all_zero_gives_zeros():
    a = torch.tensor([3.0, 4.0])
    got = karcher_mean([a.clone(), torch.zeros(2)])
    torch.testing.assert_close(got, a / 2)  # direction of a, mean norm (5 + 0) / 2
    assert torch.equal(karcher_mean([torch.zeros(2), torch.zeros(2)]), torch.zeros(2))
    one = torch.ones(3)
    assert karcher_mean([one]) is one


def test_shapes_and_options_are_checked():
    with pytest.raises(WeightkitError, match="tensor 1 has shape"):
        karcher_mean([torch.ones(2), torch.ones(3)])
    assert config_from_dict("merge", {"method": "karcher", "max_iter": 20, "tol": 1e-6}) == KarcherConfig(
        20, 1e-6
    )
    with pytest.raises(WeightkitError, match="max_iter must be an integer"):
        KarcherConfig(max_iter=[5, 10])
    with pytest.raises(WeightkitError, match="tol must be a number"):
        KarcherConfig(tol=[{"filter": "mlp", "value": 1e-6}])
