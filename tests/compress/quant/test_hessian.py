"""Tests for weightkit.compress.quant.hessian against a loop over outer products."""

import torch

from weightkit.compress.quant.hessian import add_to_hessian


def outer_product_reference(rows):
    ref = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for row in rows.double():
        ref += torch.outer(row, row)
    return ref * 2 / len(rows)


def test_add_to_hessian_matches_sum_of_outer_products():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 6, generator=g) for n in (5, 1, 9)]
    h, count = None, 0
    for b in batches:
        h, count = add_to_hessian(h, count, b)
    rows = torch.cat(batches)
    ref = outer_product_reference(rows)
    assert count == 15 and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-6)
    # A 3-D batch is flattened over its leading dims; float64 accumulation on request.
    h3, c3 = add_to_hessian(None, 0, rows.reshape(3, 5, 6), dtype=torch.float64)
    assert c3 == 15 and h3.dtype == torch.float64
    torch.testing.assert_close(h3, ref, rtol=1e-6, atol=1e-9)
    assert add_to_hessian(h, count, torch.zeros(0, 6)) == (h, count)


def test_blocked_gram_fills_both_triangles_and_leaves_the_input_alone():
    # 300 features: column blocks of 128, 128 and 44, so the off-diagonal mirroring is exercised.
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(40, 300, generator=g), torch.randn(25, 300, generator=g)
    h, count = add_to_hessian(None, 0, first.double(), dtype=torch.float64)
    kept = h.clone()
    h2, count = add_to_hessian(h, count, second.double())
    assert torch.equal(h, kept)  # a new tensor is returned; the old one is not modified
    reference = outer_product_reference(torch.cat([first, second]))
    torch.testing.assert_close(h2, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h2, h2.T, rtol=0, atol=1e-12)
