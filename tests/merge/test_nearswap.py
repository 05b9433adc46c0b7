"""Tests for weightkit.merge.nearswap against mergekit's formula evaluated entry by entry in Python floats."""

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.nearswap import NearSwapConfig, nearswap
from weightkit.registry import config_from_dict


def nearswap_reference(a, b, t):
    """w = clamp(t / max(|a - b|, 1e-6), 0, 1); w b + (1 - w) a, one entry at a time."""
    out = []
    for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist(), strict=True):
        w = min(max(t / max(abs(x - y), 1e-6), 0.0), 1.0)
        out.append(w * y + (1 - w) * x)
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.003, 0.02, 1.0])
def test_matches_reference(t):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 9, generator=g)
    b = a + 0.02 * torch.randn(12, 9, generator=g)
    b[0, :3] = a[0, :3]  # equal entries: |a - b| = 0 is floored at 1e-6
    got = nearswap(a, b, t)
    assert got.shape == a.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), nearswap_reference(a, b, t), rtol=0, atol=1e-6)


def test_each_entry_moves_at_most_t_toward_the_other_model():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, generator=g)
    b = a + 0.05 * torch.randn(1000, generator=g)
    t = 0.02
    got = nearswap(a, b, t)
    # a + clamp(b - a, -t, t): near entries take b's value, far ones move exactly t toward it.
    torch.testing.assert_close(got, a + (b - a).clamp(-t, t), rtol=0, atol=1e-6)
    near = (b - a).abs() <= t
    assert 0 < int(near.sum()) < 1000
    torch.testing.assert_close(got[near], b[near], rtol=0, atol=1e-6)


def test_t_zero_or_negative_keeps_the_base_and_a_large_t_takes_the_other_model():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(nearswap(a, b, 0.0), a)
    assert torch.equal(nearswap(a, b, -1.0), a)
    assert torch.equal(nearswap(a, b, 1e6), b)


def test_inputs_are_not_modified_and_shapes_must_match():
    a, b = torch.ones(3), torch.zeros(3)
    nearswap(a, b, 0.5)
    assert torch.equal(a, torch.ones(3)) and torch.equal(b, torch.zeros(3))
    with pytest.raises(WeightkitError, match="same shape"):
        nearswap(torch.ones(3), torch.ones(4), 0.1)


def test_t_is_required_and_may_be_a_gradient():
    with pytest.raises(WeightkitError, match="nearswap needs t"):
        config_from_dict("merge", {"method": "nearswap"})
    assert config_from_dict("merge", {"method": "nearswap", "t": [0.001, 0.01]}) == NearSwapConfig(
        t=[0.001, 0.01]
    )
    with pytest.raises(WeightkitError, match="nearswap: t"):
        NearSwapConfig(t="0.1")
