"""Tests for weightkit.merge.gram: dot products against float64 sums."""

import math

import torch

from weightkit.merge.gram import dot, gram


def test_gram_matches_python_sums_on_short_vectors():
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(3, 7, generator=g) for _ in range(3)]
    center = torch.randn(3, 7, generator=g)
    got = gram(vectors, center=center)
    flats = [
        [float(x) - float(c) for x, c in zip(v.reshape(-1), center.reshape(-1), strict=True)] for v in vectors
    ]
    for i in range(3):
        for j in range(3):
            expected = math.fsum(a * b for a, b in zip(flats[i], flats[j], strict=True))
            assert math.isclose(float(got[i, j]), expected, rel_tol=1e-6)


def test_gram_is_accurate_over_millions_of_entries():
    # Several chunks of 2**20 plus a tail that is not a whole block: within 1e-8 of float64 sums, where one
    # float32 dot product is off by ~1e-6.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3 * 2**20 + 1500, generator=g) + 0.1
    b = a + 0.01 * torch.randn(a.shape, generator=g)
    got = gram([a, b])
    expected = torch.stack([a.double(), b.double()]) @ torch.stack([a.double(), b.double()]).T
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0)
    assert got.dtype == torch.float64


def test_gram_of_bfloat16_vectors_is_computed_in_float32_without_changing_them():
    # The copying path (vectors not in their compute dtype); float32 vectors take the copy-free one.
    g = torch.Generator().manual_seed(2)
    vectors = [torch.randn(5000, generator=g).bfloat16() for _ in range(3)]
    before = [v.clone() for v in vectors]
    got = gram(vectors)
    stacked = torch.stack([v.double() for v in vectors])
    torch.testing.assert_close(got, stacked @ stacked.T, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gram([v.float() for v in vectors]), stacked @ stacked.T, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(v, w) for v, w in zip(vectors, before, strict=True))


def test_dot_is_as_accurate_as_gram_for_any_shape_and_dtype():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2**20 + 700, generator=g) + 0.1
    b = a + 0.01 * torch.randn(a.shape, generator=g)
    assert math.isclose(dot(a, b), float(a.double() @ b.double()), rel_tol=1e-8)
    # Non-contiguous views are read as their flattened values.
    x, y = a[: 7 * 1000].reshape(-1, 7)[:, :5], b[: 7 * 1000].reshape(-1, 7)[:, :5]
    assert math.isclose(dot(x, y), float(x.double().reshape(-1) @ y.double().reshape(-1)), rel_tol=1e-7)
    small = torch.randn(5, generator=g).bfloat16()
    assert math.isclose(dot(small, small), float(small.double() @ small.double()), rel_tol=1e-6)
    assert dot(torch.zeros(0), torch.zeros(0)) == 0.0
