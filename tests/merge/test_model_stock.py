"""Tests for weightkit.merge.model_stock against the paper's ratio computed with Python loops."""

import itertools
import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.model_stock import model_stock
from weightkit.registry import config_from_dict


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def stock_reference(base, tensors, eps=1e-8):
    """Mean pairwise cosine of the flattened deltas (clamped at 0), t = k cos / (1 + (k-1) cos),
    result t * mean(tensors) + (1 - t) * base, element by element in Python floats."""
    b = [float(v) for v in base.reshape(-1)]
    ts = [[float(v) for v in t.reshape(-1)] for t in tensors]
    deltas = [[x - y for x, y in zip(t, b, strict=True)] for t in ts]
    cosines = []
    for d_i, d_j in itertools.combinations(deltas, 2):
        dot = sum(x * y for x, y in zip(d_i, d_j, strict=True))
        norms = math.sqrt(sum(x * x for x in d_i)) * math.sqrt(sum(y * y for y in d_j))
        cosines.append(min(max(dot / max(norms, eps), -1.0), 1.0))
    cos = max(sum(cosines) / len(cosines), 0.0)
    k = len(tensors)
    t = k * cos / (1 + (k - 1) * cos)
    out = [t * sum(col) / k + (1 - t) * x for x, col in zip(b, zip(*ts, strict=True), strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape), t


def finetunes(base, k, shared=1.0, noise=1.0, seed=0):
    """k fine-tuned tensors whose deltas share a common direction (positive mean cosine)."""
    common = randn(*base.shape, seed=seed)
    return [base + shared * common + noise * randn(*base.shape, seed=seed + 1 + i) for i in range(k)]


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("shape", [(12,), (6, 7), (2, 3, 4)])
def test_matches_reference(k, shape):
    base = randn(*shape, seed=100)
    tensors = finetunes(base, k, seed=k)
    expected, t = stock_reference(base, tensors)
    assert 0.1 < t < 0.99  # the case exercises a real interpolation
    got = model_stock(base, tensors)
    assert got.shape == base.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_ratio_follows_the_paper_for_a_known_angle():
    # Two deltas at 60 degrees (cos 0.5): t = 2 * 0.5 / (1 + 0.5) = 2/3.
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    got = model_stock(base, [a, b])
    torch.testing.assert_close(got, (2 / 3) * (a + b) / 2, rtol=1e-6, atol=1e-7)


def test_identical_deltas_return_the_finetuned_model():
    base = randn(5, 6, seed=1)
    finetuned = base + 0.01 * randn(5, 6, seed=2)
    for k in (2, 4):
        torch.testing.assert_close(model_stock(base, [finetuned] * k), finetuned, rtol=1e-6, atol=1e-6)


def test_orthogonal_or_opposed_deltas_return_the_base():
    base = randn(4, seed=3)
    e0, e1 = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0, 0.0])
    assert torch.equal(model_stock(base, [base + e0, base + e1]), base)
    # cos = -1: the raw formula would divide by 1 + (k - 1) cos = 0; the clamp at 0 gives the base.
    opposed = model_stock(base, [base + e0, base - e0])
    assert torch.isfinite(opposed).all()
    assert torch.equal(opposed, base)


def test_zero_deltas_give_the_base_without_nan():
    base = randn(3, 3, seed=4)
    out = model_stock(base, [base.clone(), base.clone(), base.clone()])
    assert torch.equal(out, base)


def test_one_dimensional_tensors_use_one_flattened_cosine():
    base = randn(4, 5, seed=5)
    tensors = finetunes(base, 3, seed=6)
    flat = model_stock(base.reshape(-1), [t.reshape(-1) for t in tensors])
    assert torch.equal(flat, model_stock(base, tensors).reshape(-1))


def test_large_tensor_crosses_chunks():
    # 1.1M elements: more than one 2^20-element chunk and a tail that is not a multiple of 1024.
    base = randn(1100, 1001, seed=7) * 0.02
    tensors = [
        base + 0.001 * randn(1100, 1001, seed=8) + 0.002 * randn(1100, 1001, seed=9 + i) for i in range(2)
    ]
    deltas = [(t - base).double().reshape(-1) for t in tensors]
    cos = float(deltas[0] @ deltas[1] / (deltas[0].norm() * deltas[1].norm()))
    t = 2 * cos / (1 + cos)
    expected = t * (tensors[0].double() + tensors[1].double()) / 2 + (1 - t) * base.double()
    got = model_stock(base, tensors)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_inputs_are_not_modified():
    base = randn(3, 4, seed=10)
    tensors = finetunes(base, 2, seed=11)
    copies = [base.clone()] + [t.clone() for t in tensors]
    out = model_stock(base, tensors)
    assert all(torch.equal(x, c) for x, c in zip([base, *tensors], copies, strict=True))
    assert all(out.data_ptr() != x.data_ptr() for x in [base, *tensors])


def test_bad_inputs_are_refused():
    base = torch.zeros(3)
    with pytest.raises(WeightkitError, match="at least 2"):
        model_stock(base, [torch.ones(3)])
    with pytest.raises(WeightkitError, match="shape"):
        model_stock(base, [torch.ones(3), torch.ones(4)])


def test_filter_wise_false_is_what_model_stock_computes_and_true_is_refused():
    # The option list used to be empty ("unknown option 'filter_wise'. Options: ").
    assert config_from_dict("merge", {"method": "model_stock", "filter_wise": False}).filter_wise is False
    with pytest.raises(WeightkitError, match="filter_wise=True is not implemented"):
        config_from_dict("merge", {"method": "model_stock", "filter_wise": True})
