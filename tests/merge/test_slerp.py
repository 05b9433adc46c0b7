"""Tests for weightkit.merge.slerp against the SLERP formula evaluated element by element in Python floats."""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.slerp import slerp


def slerp_reference(a, b, t, eps=1e-8, threshold=0.9995):
    """mergekit's definition with Python floats: angle of the normalised copies, lerp when colinear."""
    xs = [float(v) for v in a.reshape(-1)]
    ys = [float(v) for v in b.reshape(-1)]
    norm_x = math.sqrt(sum(x * x for x in xs))
    norm_y = math.sqrt(sum(y * y for y in ys))
    unit_x = [x / norm_x for x in xs] if norm_x > eps else xs
    unit_y = [y / norm_y for y in ys] if norm_y > eps else ys
    dot = sum(x * y for x, y in zip(unit_x, unit_y, strict=True))
    if abs(dot) > threshold:
        out = [(1 - t) * x + t * y for x, y in zip(xs, ys, strict=True)]
    else:
        theta = math.acos(dot)
        s0 = math.sin(theta * (1 - t)) / math.sin(theta)
        s1 = math.sin(theta * t) / math.sin(theta)
        out = [s0 * x + s1 * y for x, y in zip(xs, ys, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


def pair_with_cosine(cos, n=16, seed=0):
    """Two unit vectors of length n whose cosine is exactly ``cos`` (up to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    u /= u.norm()
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v -= (v @ u) * u
    v /= v.norm()
    return u.float(), (cos * u + math.sqrt(1 - cos * cos) * v).float()


# (37, 53) has 1961 elements: more than one 1024-element dot block plus a tail.
@pytest.mark.parametrize("shape", [(7,), (3, 5), (37, 53)])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_matches_reference(shape, t):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(shape, generator=gen)
    b = 0.3 * torch.randn(shape, generator=gen) + 0.5 * a
    got = slerp(a, b, t)
    assert got.shape == a.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), slerp_reference(a, b, t), rtol=1e-5, atol=1e-6)


def test_ends_are_returned_exactly():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)


def test_orthogonal_unit_vectors_keep_unit_norm():
    a, b = pair_with_cosine(0.0, seed=3)
    mid = slerp(a, b, 0.5)
    # Linear interpolation would shrink the midpoint to norm cos(45 degrees) = 0.707.
    assert abs(float(mid.norm()) - 1.0) < 1e-6
    torch.testing.assert_close(mid, (a + b) / math.sqrt(2), rtol=1e-6, atol=1e-6)
    for t in (0.1, 0.3, 0.8):
        assert abs(float(slerp(a, b, t).norm()) - 1.0) < 1e-6


@pytest.mark.parametrize("factor", [3.0, -2.0])
def test_parallel_vectors_fall_back_to_lerp(factor):
    a = torch.randn(10, generator=torch.Generator().manual_seed(4))
    b = factor * a
    for t in (0.0, 0.3, 0.5, 1.0):
        got = slerp(a, b, t)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, (1 - t) * a + t * b, rtol=1e-6, atol=1e-6)


def test_colinearity_threshold_is_on_the_normalised_dot_product():
    # Just below the threshold the result is a true slerp (unit norm), just above it a lerp (norm
    # cos(theta / 2) < 1): each assertion fails if the threshold or the normalisation is wrong.
    below_a, below_b = pair_with_cosine(0.9990, seed=5)
    above_a, above_b = pair_with_cosine(0.9999, seed=5)
    below = slerp(7.0 * below_a, 7.0 * below_b, 0.5)
    above = slerp(7.0 * above_a, 7.0 * above_b, 0.5)
    assert abs(float(below.norm()) - 7.0) < 1e-5
    assert abs(float(above.norm()) - 7.0 * math.sqrt((1 + 0.9999) / 2)) < 1e-5
    torch.testing.assert_close(below.double(), slerp_reference(7.0 * below_a, 7.0 * below_b, 0.5))
    torch.testing.assert_close(above.double(), slerp_reference(7.0 * above_a, 7.0 * above_b, 0.5))


def test_interpolation_applies_to_unnormalised_tensors():
    a, b = pair_with_cosine(0.0, seed=6)
    mid = slerp(2.0 * a, 4.0 * b, 0.5)
    torch.testing.assert_close(mid, (2.0 * a + 4.0 * b) / math.sqrt(2), rtol=1e-6, atol=1e-6)


def test_zero_tensor_is_not_normalised():
    b = torch.randn(6, generator=torch.Generator().manual_seed(7))
    a = torch.zeros(6)
    for t in (0.25, 0.5):
        got = slerp(a, b, t)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, math.sin(t * math.pi / 2) * b, rtol=1e-6, atol=1e-7)


def test_non_contiguous_inputs_and_no_modification():
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(6, 5, generator=gen).T, torch.randn(6, 5, generator=gen).T
    a_copy, b_copy = a.clone(), b.clone()
    got = slerp(a, b, 0.4)
    assert torch.equal(a, a_copy) and torch.equal(b, b_copy)
    torch.testing.assert_close(got.double(), slerp_reference(a_copy, b_copy, 0.4), rtol=1e-5, atol=1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(WeightkitError, match="same shape"):
        slerp(torch.ones(3), torch.ones(4), 0.5)


def test_slerp_can_write_into_its_first_input_but_not_its_second():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    expected = slerp(a, b, 0.3)
    buffer = a.clone()
    assert slerp(buffer, b, 0.3, out=buffer) is buffer
    assert torch.equal(buffer, expected)
    with pytest.raises(WeightkitError, match="out may be a but not b"):
        slerp(a, b, 0.3, out=b)
