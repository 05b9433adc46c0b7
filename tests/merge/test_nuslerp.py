"""Tests for weightkit.merge.nuslerp against mergekit's NuSLERP, vector by vector in Python floats."""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.nuslerp import NuSlerpConfig, nuslerp, nuslerp_factor
from weightkit.registry import config_from_dict


def slerp_vector(xs, ys, t):
    """mergekit's nuslerp of two lists of floats: normalise (norms floored at 1e-7), lerp only if colinear."""
    nx = max(math.sqrt(sum(x * x for x in xs)), 1e-7)
    ny = max(math.sqrt(sum(y * y for y in ys)), 1e-7)
    cos = min(max(sum(x / nx * y / ny for x, y in zip(xs, ys, strict=True)), -1.0), 1.0)
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(xs, ys, strict=True)]
    theta = math.acos(cos)
    s0, s1 = math.sin((1 - t) * theta), math.sin(t * theta)
    return [(s0 * x + s1 * y) / math.sin(theta) for x, y in zip(xs, ys, strict=True)]


def nuslerp_reference(a, b, t, dim):
    if dim is None:
        out = slerp_vector(a.reshape(-1).tolist(), b.reshape(-1).tolist(), t)
        return torch.tensor(out, dtype=torch.float64).reshape(a.shape)
    rows_a, rows_b = a.movedim(dim, -1), b.movedim(dim, -1)
    out = [slerp_vector(x, y, t) for x, y in zip(rows_a.tolist(), rows_b.tolist(), strict=True)]
    return torch.tensor(out, dtype=torch.float64).movedim(-1, dim)


@pytest.mark.parametrize("dim", [None, -1, 0])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_matches_reference(dim, t):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 9, generator=g)
    b = 0.7 * a + 0.5 * torch.randn(6, 9, generator=g)
    got = nuslerp(a, b, t, dim=dim)
    assert got.shape == a.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), nuslerp_reference(a, b, t, dim), rtol=1e-5, atol=1e-6)


def test_t_zero_gives_the_first_tensor_and_t_one_the_second():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for dim in (None, -1, 0):
        assert torch.equal(nuslerp(a, b, 0.0, dim=dim), a)
        torch.testing.assert_close(nuslerp(a, b, 1.0, dim=dim), b, rtol=0, atol=1e-6)


def test_nearly_colinear_vectors_stay_on_the_sphere_unlike_slerps_lerp_fallback():
    # cos = 0.9999 is past slerp's 0.9995 threshold (linear interpolation there); nuslerp still follows
    # the great circle, so the midpoint of two unit vectors has norm 1, not cos(theta / 2) = 0.999975.
    g = torch.Generator().manual_seed(2)
    u = torch.randn(64, generator=g, dtype=torch.float64)
    u /= u.norm()
    v = torch.randn(64, generator=g, dtype=torch.float64)
    v -= (v @ u) * u
    v /= v.norm()
    cos = 0.9999
    a, b = u, cos * u + math.sqrt(1 - cos * cos) * v
    mid = nuslerp(a, b, 0.5)
    assert abs(float(mid.norm()) - 1) < 1e-12
    assert abs(float(((a + b) / 2).norm()) - 1) > 2e-5


def test_each_row_gets_its_own_angle():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 8, generator=g)
    b = torch.stack([a[0] * 2.0, -a[1], torch.randn(8, generator=g)])
    rows = nuslerp(a, b, 0.25, dim=-1)
    for i in range(3):
        torch.testing.assert_close(rows[i], nuslerp(a[i], b[i], 0.25), rtol=1e-6, atol=1e-7)
    # Colinear rows interpolate linearly: a[0] and 2 a[0] give 1.25 a[0] at t = 0.25.
    torch.testing.assert_close(rows[0], 1.25 * a[0], rtol=1e-6, atol=1e-7)
    columns = nuslerp(a, b, 0.25, dim=0)
    for j in range(8):
        torch.testing.assert_close(columns[:, j], nuslerp(a[:, j], b[:, j], 0.25), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(rows, nuslerp(a, b, 0.25))


def test_a_zero_vector_is_at_right_angles_to_everything():
    b = torch.tensor([3.0, 4.0])
    got = nuslerp(torch.zeros(2), b, 0.5)
    torch.testing.assert_close(got, math.sin(math.pi / 4) * b)
    assert torch.equal(nuslerp(torch.zeros(2), torch.zeros(2), 0.3), torch.zeros(2))


def test_a_non_finite_input_makes_its_vector_non_finite():
    a, b = torch.ones(2, 3), torch.ones(2, 3) * 2
    a[1, 1] = float("nan")
    assert not torch.isfinite(nuslerp(a, b, 0.5)).all()
    rows = nuslerp(a, b, 0.5, dim=-1)
    assert torch.isfinite(rows[0]).all() and torch.isnan(rows[1]).all()


def test_the_factor_is_the_second_weights_share():
    assert nuslerp_factor([1.0, 3.0]) == 0.75
    assert nuslerp_factor([2.0, 0.0]) == 0.0
    assert nuslerp_factor([1.0, -1.0]) == 0.5  # mergekit's answer to a zero sum


def test_shapes_and_dims_are_checked():
    with pytest.raises(WeightkitError, match="same shape"):
        nuslerp(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(WeightkitError, match="dim 2"):
        nuslerp(torch.ones(3, 4), torch.ones(3, 4), 0.5, dim=2)


def test_config_takes_mergekits_options_and_refuses_per_tensor_switches():
    config = config_from_dict(
        "merge", {"method": "nuslerp", "nuslerp_flatten": False, "nuslerp_row_wise": True}
    )
    assert config == NuSlerpConfig(nuslerp_flatten=False, nuslerp_row_wise=True)
    with pytest.raises(WeightkitError, match=r"nuslerp_flatten=\[True, False\]: expected true or false"):
        config_from_dict("merge", {"method": "nuslerp", "nuslerp_flatten": [True, False]})
    with pytest.raises(WeightkitError, match="unknown option 'normalize'"):
        config_from_dict("merge", {"method": "nuslerp", "normalize": True})
