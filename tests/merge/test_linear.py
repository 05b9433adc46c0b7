"""Tests for weightkit.merge.linear: the weighted average (model soup) against an element-by-element sum."""

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.linear import linear


def linear_reference(tensors, weights, normalize):
    """sum_i w_i t_i (/ sum_i w_i), one element at a time in Python floats."""
    flats = [[float(v) for v in t.reshape(-1)] for t in tensors]
    total = sum(weights)
    out = []
    for j in range(len(flats[0])):
        value = sum(w * flat[j] for w, flat in zip(weights, flats, strict=True))
        out.append(value / total if normalize else value)
    return torch.tensor(out, dtype=torch.float64).reshape(tensors[0].shape)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [1.0, 2.0, -0.5], [3.0, 1.0, 1.0]])
def test_matches_weighted_sum(weights, normalize):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 7, generator=gen) for _ in weights]
    got = linear(tensors, weights, normalize=normalize)
    assert got.dtype == torch.float32 and got.shape == (4, 7)
    torch.testing.assert_close(
        got.double(), linear_reference(tensors, weights, normalize), rtol=1e-6, atol=1e-6
    )


def test_normalize_divides_by_the_weight_sum():
    a, b = torch.full((3,), 2.0), torch.full((3,), 4.0)
    assert torch.equal(linear([a, b], [1.0, 3.0]), torch.full((3,), 3.5))
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), torch.full((3,), 14.0))


def test_merging_a_model_with_itself_returns_it():
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(linear([x, x, x], [0.1, 0.7, 0.2]), x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(linear([x], [2.5]), x, rtol=1e-6, atol=1e-7)


def test_inputs_are_not_modified():
    tensors = [torch.randn(3, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    copies = [t.clone() for t in tensors]
    out = linear(tensors, [0.5, 0.5])
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies, strict=True))
    assert all(out.data_ptr() != t.data_ptr() for t in tensors)


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [0.1, 0.2, -0.3]])
def test_zero_weight_sum_is_refused_when_normalizing(weights):
    tensors = [torch.ones(2) for _ in weights]
    with pytest.raises(WeightkitError, match="sum to zero"):
        linear(tensors, weights)
    # Without normalization a zero sum is an ordinary weighted sum.
    expected = torch.full((2,), float(sum(torch.tensor(weights, dtype=torch.float32))))
    torch.testing.assert_close(linear(tensors, weights, normalize=False), expected, atol=1e-7, rtol=0)


def test_bad_inputs_are_refused():
    with pytest.raises(WeightkitError, match="at least one"):
        linear([], [])
    with pytest.raises(WeightkitError, match="2 tensors but 1 weights"):
        linear([torch.ones(2), torch.ones(2)], [1.0])
    with pytest.raises(WeightkitError, match="shape"):
        linear([torch.ones(2), torch.ones(3)], [1.0, 1.0])


def test_out_may_be_the_first_tensor_but_no_other():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    expected = linear(tensors, [0.5, 0.3, 0.2])
    first = tensors[0].clone()
    out = linear([first, *tensors[1:]], [0.5, 0.3, 0.2], out=first)
    assert out.data_ptr() == first.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(WeightkitError, match="out may be tensors\\[0\\] but no other input"):
        linear(tensors, [0.5, 0.3, 0.2], out=tensors[1])
    with pytest.raises(WeightkitError, match="out has shape"):
        linear(tensors, [0.5, 0.3, 0.2], out=torch.empty(20))
