"""Tests for weightkit.compress.quant.hessian against a loop over outer products."""

import pytest
import torch

from weightkit.compress.quant.hessian import Hessian
from weightkit.errors import WeightkitError


def outer_product_reference(rows):
    ref = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for row in rows.double():
        ref += torch.outer(row, row)
    return ref * 2 / len(rows)


def test_hessian_matches_sum_of_outer_products():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 6, generator=g) for n in (5, 1, 0, 9)]
    h = Hessian()
    for b in batches:
        h.add(b)
    rows = torch.cat(batches)
    ref = outer_product_reference(rows)
    assert h.count == 15 and h.value().dtype == torch.float32
    torch.testing.assert_close(h.value().double(), ref, rtol=1e-5, atol=1e-6)
    # A 3-D batch is flattened over its leading dims; float64 accumulation on request.
    h3 = Hessian(torch.float64)
    h3.add(rows.reshape(3, 5, 6))
    assert h3.count == 15 and h3.value().dtype == torch.float64
    torch.testing.assert_close(h3.value(), ref, rtol=1e-6, atol=1e-9)


def test_blocked_gram_fills_both_triangles_and_can_be_read_while_accumulating():
    # 300 features: column blocks of 128, 128 and 44, so the off-diagonal mirroring is exercised.
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(40, 300, generator=g), torch.randn(25, 300, generator=g)
    h = Hessian(torch.float64)
    h.add(first.double())
    torch.testing.assert_close(h.value(), outer_product_reference(first), rtol=1e-10, atol=1e-12)
    h.add(second.double())
    value = h.value()
    reference = outer_product_reference(torch.cat([first, second]))
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    assert torch.equal(value, value.T)


def test_hessian_refuses_other_widths_and_no_inputs():
    h = Hessian()
    with pytest.raises(WeightkitError, match="none were added"):
        h.value()
    h.add(torch.ones(2, 4))
    with pytest.raises(WeightkitError, match="4 features but the inputs have 5"):
        h.add(torch.ones(2, 5))
