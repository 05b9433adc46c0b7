"""Tests for weightkit.merge.sce (and its select step, sparsify.variance_select) against a plain per-entry
reference of mergekit's SCE."""

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.sce import SCEConfig, sce, sce_weights
from weightkit.merge.sparsify import variance_select
from weightkit.registry import config_from_dict


def sce_reference(base, tensors, select_topk):
    """SCE entry by entry in float64: variance top-k, mean-square weights, sign election, disjoint mean."""
    n = len(tensors)
    deltas = [(t - base).double().reshape(-1).tolist() for t in tensors]
    size = len(deltas[0])
    if select_topk < 1:
        variances = []
        for j in range(size):
            values = [d[j] for d in deltas]
            mean = sum(values) / n
            variances.append(sum((v - mean) ** 2 for v in values) / n)
        nonzero = sum(v != 0 for v in variances)
        k = int(torch.tensor(nonzero) * select_topk)  # mergekit's float32 product
        kept = set(sorted(range(size), key=lambda j: (-variances[j], j))[:k])
        deltas = [[x if j in kept else 0.0 for j, x in enumerate(d)] for d in deltas]
    squares = [sum(x * x for x in d) / size for d in deltas]
    weights = [s / sum(squares) for s in squares] if sum(squares) >= 1e-6 else [1 / n] * n
    out = []
    for j, b in enumerate(base.double().reshape(-1).tolist()):
        values = [d[j] for d in deltas]
        sign = 1 if sum(values) >= 0 else -1
        agree = [v * sign > 0 for v in values]
        numerator = sum(w * v for w, v, a in zip(weights, values, agree, strict=True) if a)
        divisor = max(sum(w for w, a in zip(weights, agree, strict=True) if a), 1e-6)
        out.append(b + numerator / divisor)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def models(seed, n=3, shape=(9, 7), scales=(0.5, 1.0, 0.25)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + s * torch.randn(shape, generator=g) for s in scales[:n]]


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_matches_reference(select_topk):
    base, tensors = models(0)
    expected = sce_reference(base, tensors, select_topk)
    got = sce(base, [t.clone() for t in tensors], select_topk=select_topk)
    assert got.shape == base.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_select_topk_zero_gives_the_base_and_no_models_give_a_copy_of_it():
    base, tensors = models(1)
    assert torch.equal(sce(base, tensors, select_topk=0.0), base)
    copy = sce(base, [])
    assert torch.equal(copy, base) and copy is not base


def test_entries_against_the_elected_sign_are_erased():
    base = torch.zeros(3)
    # Entry 0: +1, +1, -3 sums to -1: only the third model's -3 agrees; entry 1: all positive.
    tensors = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-3.0, 1.0, 0.0])]
    got = sce(base, [t.clone() for t in tensors])
    assert float(got[0]) == pytest.approx(-3.0)
    assert 1.0 < float(got[1]) < 2.0 and float(got[2]) == 0.0


def test_weights_are_the_models_mean_squares_or_equal_below_mergekits_floor():
    big = [torch.full((4,), 0.1), torch.full((4,), 0.2)]  # mean squares 0.01 and 0.04
    torch.testing.assert_close(sce_weights(big), torch.tensor([0.2, 0.8]))
    # Real fine-tunes' task vectors are ~1e-3: mean squares summing below 1e-6 weigh every model equally.
    small = [torch.full((4,), 1e-4), torch.full((4,), 5e-4)]
    torch.testing.assert_close(sce_weights(small), torch.tensor([0.5, 0.5]))


def test_variance_select_keeps_mergekits_count_of_the_most_varying_entries():
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(10, 10, generator=g) for _ in range(3)]
    keep = variance_select(deltas, 0.29)
    # 100 * 0.29 is 28.999999999999996 in double but rounds to 29.0 in float32, mergekit's arithmetic.
    assert int(keep.sum()) == 29
    variance = torch.stack(deltas).var(dim=0, unbiased=False)
    assert float(variance[keep].min()) >= float(variance[~keep].max())
    assert variance_select(deltas, 1.0) is None
    assert not variance_select(deltas, 0.0).any()
    # Entries with zero variance (every model agrees) are not counted, so never selected.
    deltas[0][0], deltas[1][0], deltas[2][0] = 0.5, 0.5, 0.5
    assert int(variance_select(deltas, 1 - 1e-9)[0].sum()) == 0


def test_config_options():
    config = config_from_dict("merge", {"method": "sce", "select_topk": [0.3, 1.0], "int8_mask": True})
    assert config == SCEConfig(select_topk=[0.3, 1.0], int8_mask=True)
    with pytest.raises(WeightkitError, match="select_topk must be in"):
        SCEConfig(select_topk=1.5)
    with pytest.raises(WeightkitError, match="unknown option 'density'"):
        config_from_dict("merge", {"method": "sce", "density": 0.5})
