"""Tests for weightkit.merge.arcee_fusion against mergekit's definition, row by row in Python floats."""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.arcee_fusion import arcee_fusion, fusion_importance, fusion_threshold
from weightkit.registry import config_from_dict


def importance_reference(a, b):
    """|b - a| times KL(softmax(b) + 1e-8 || softmax(a) + 1e-8), one row (last dimension) at a time."""

    def softmax(xs):
        top = max(xs)
        exps = [math.exp(x - top) for x in xs]
        return [e / sum(exps) + 1e-8 for e in exps]

    rows_a, rows_b = (
        a.double().reshape(-1, a.shape[-1]).tolist(),
        b.double().reshape(-1, a.shape[-1]).tolist(),
    )
    out = []
    for xs, ys in zip(rows_a, rows_b, strict=True):
        p, q = softmax(ys), softmax(xs)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        out.append([abs(y - x) * kl for x, y in zip(xs, ys, strict=True)])
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


def fence_reference(values):
    ordered = sorted(values.reshape(-1).tolist())
    at = [ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75)]
    return at[1] + 1.5 * (at[2] - at[0])


@pytest.mark.parametrize("shape", [(64,), (8, 16), (3, 4, 5)])
def test_importance_and_choice_match_the_reference(shape):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g)
    b = a + 0.3 * torch.randn(shape, generator=g) ** 3  # heavy tails: a few entries changed a lot
    importance = fusion_importance(a, b)
    torch.testing.assert_close(importance.double(), importance_reference(a, b), rtol=1e-4, atol=1e-9)
    fence = float(fusion_threshold(importance))
    assert fence == pytest.approx(fence_reference(importance), rel=1e-6)
    got = arcee_fusion(a, b)
    chosen = importance >= fence
    assert 0 < int(chosen.sum()) < chosen.numel()
    assert torch.equal(got[chosen], (a + (b - a))[chosen])
    assert torch.equal(got[~chosen], a[~chosen])


def test_identical_models_give_the_base():
    a = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(arcee_fusion(a, a.clone()), a)


def test_quantiles_are_exact_beyond_mergekits_sample_size():
    # mergekit estimates the quantiles of a tensor over 1,000,000 entries from a random sample; weightkit
    # takes them exactly, from every entry.
    values = torch.rand(1_000_003, generator=torch.Generator().manual_seed(2))
    ordered = values.sort().values
    n = values.numel()
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    assert torch.equal(fusion_threshold(values), median + 1.5 * (q3 - q1))


def test_inputs_are_checked_and_there_are_no_options():
    with pytest.raises(WeightkitError, match="same shape"):
        arcee_fusion(torch.ones(3), torch.ones(4))
    with pytest.raises(WeightkitError, match="empty tensor"):
        arcee_fusion(torch.ones(0), torch.ones(0))
    with pytest.raises(WeightkitError, match="It takes no options"):
        config_from_dict("merge", {"method": "arcee_fusion", "t": 0.5})
