"""Tests for weightkit.quantized.grid: min/max grids (optionally clipped), rounding, dequantization."""

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantScheme, compute_qparams, dequantize, quantize_to_grid, rtn_quantize


def qparams_reference(w: torch.Tensor, scheme: QuantScheme, clip=None):
    """The module docstring's formulas, one (row, group) at a time with Python floats."""
    rows, cols = w.shape
    group = scheme.group_size or cols
    levels = 2**scheme.bits - 1
    scales, zeros = [], []
    for r in range(rows):
        srow, zrow = [], []
        for g in range(cols // group):
            vals = [float(v) for v in w[r, g * group : (g + 1) * group]]
            ratio = 1.0 if clip is None else float(clip[r, g])
            if scheme.symmetric:
                srow.append(max(abs(v) for v in vals) * ratio / (levels / 2))
            else:
                lo, hi = min(min(vals), 0.0) * ratio, max(max(vals), 0.0) * ratio
                s = (hi - lo) / levels
                srow.append(s)
                zrow.append(min(max(scheme.q_min - round(lo / s), scheme.q_min), scheme.q_max))
        scales.append(srow)
        zeros.append(zrow)
    return torch.tensor(scales, dtype=torch.float64), None if scheme.symmetric else torch.tensor(zeros)


def quantize_reference(w, scale, zero, scheme):
    rows, cols = w.shape
    group = cols // scale.shape[1]
    q = torch.empty(rows, cols, dtype=torch.int8)
    for r in range(rows):
        for c in range(cols):
            z = 0 if zero is None else int(zero[r, c // group])
            v = round(float(w[r, c]) / float(scale[r, c // group])) + z
            q[r, c] = min(max(v, scheme.q_min), scheme.q_max)
    return q


SCHEMES = [
    QuantScheme(4, None, True),
    QuantScheme(4, None, False),
    QuantScheme(3, 8, True),
    QuantScheme(3, 8, False),
    QuantScheme(2, 16, False),
    QuantScheme(8, 4, True),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_qparams_and_grid_match_loop_reference(scheme):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(scheme.bits), dtype=torch.float64)
    w[0] += 1.0  # an all-positive row: the asymmetric range must still contain 0
    scale, zero = compute_qparams(w, scheme)
    ref_scale, ref_zero = qparams_reference(w, scheme)
    groups = 32 // (scheme.group_size or 32)
    assert scale.shape == (6, groups) and scale.dtype == torch.float64
    torch.testing.assert_close(scale, ref_scale, rtol=1e-12, atol=0)
    if scheme.symmetric:
        assert zero is None
    else:
        assert zero.dtype == torch.int8 and zero.shape == (6, groups)
        assert torch.equal(zero.long(), ref_zero.long())
    q = quantize_to_grid(w, scale, zero, scheme)
    assert torch.equal(q, quantize_reference(w, scale, zero, scheme))
    # Every weight inside the grid's range dequantizes within half a step.
    w_hat = dequantize(q, scale, zero)
    step = scale.repeat_interleave(scheme.group_size or 32, dim=1)
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-12).all())


def test_asymmetric_grid_represents_zero_exactly():
    w = torch.rand(4, 16) + 0.5  # strictly positive weights
    w[:, 3] = 0
    w_hat = rtn_quantize(w, QuantScheme(3, 8, False)).dequantize()
    assert bool((w_hat[:, 3] == 0).all())


def test_asymmetric_beats_symmetric_on_skewed_rows():
    w = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))  # all positive
    err_sym = (w - rtn_quantize(w, QuantScheme(4, 32, True)).dequantize()).norm()
    err_asym = (w - rtn_quantize(w, QuantScheme(4, 32, False)).dequantize()).norm()
    assert err_asym < 0.6 * err_sym


def test_groups_fit_better_than_per_channel():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    w[:, 5] *= 20  # one outlier column only coarsens the grid of its own group
    # Compare on the other groups' columns, which the outlier no longer affects.
    err_channel = (w - rtn_quantize(w, QuantScheme(4, None)).dequantize())[:, 32:].norm()
    err_group = (w - rtn_quantize(w, QuantScheme(4, 32)).dequantize())[:, 32:].norm()
    assert err_group < 0.2 * err_channel


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_clip_ratio_matches_loop_reference(scheme):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 32, generator=gen, dtype=torch.float64)
    groups = 32 // (scheme.group_size or 32)
    clip = torch.rand(5, groups, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    scale, zero = compute_qparams(w, scheme, clip_ratio=clip)
    ref_scale, ref_zero = qparams_reference(w, scheme, clip)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-12, atol=0)
    if zero is not None:
        assert torch.equal(zero.long(), ref_zero.long())
    # A scalar ratio is the same for every group; ratio 1 is no clipping.
    s_scalar, _ = compute_qparams(w, scheme, clip_ratio=0.75)
    torch.testing.assert_close(
        s_scalar, compute_qparams(w, scheme, clip_ratio=torch.full((5, groups), 0.75))[0]
    )
    assert torch.equal(compute_qparams(w, scheme, clip_ratio=1.0)[0], compute_qparams(w, scheme)[0])
    qw = rtn_quantize(w, scheme, clip_ratio=clip)
    assert torch.equal(qw.scale, scale)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_a_weight_rounded_in_row_blocks_is_the_weight_rounded_whole(monkeypatch, scheme):
    """rtn_quantize bounds its temporaries by rounding a few rows at a time: with blocks of 2 rows (7 rows:
    4 blocks, the last one short) every value, scale and zero point must equal the one-block result, clipped
    per group or by one ratio; a wrong clip ratio is still refused naming the whole weight's shape."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(7, 32, generator=gen)
    clip = torch.rand(7, 32 // (scheme.group_size or 32), generator=gen) * 0.5 + 0.5
    whole = [rtn_quantize(w, scheme, clip_ratio=ratio) for ratio in (None, clip, 0.8)]
    monkeypatch.setattr("weightkit.quantized.grid._RTN_BLOCK_VALUES", 64)  # 2 rows of 32
    for ratio, expected in zip((None, clip, 0.8), whole, strict=True):
        blocked = rtn_quantize(w, scheme, clip_ratio=ratio)
        assert torch.equal(blocked.qweight, expected.qweight)
        assert torch.equal(blocked.scale, expected.scale)
        assert (blocked.zero_point is None) == scheme.symmetric
        if not scheme.symmetric:
            assert torch.equal(blocked.zero_point, expected.zero_point)
    with pytest.raises(WeightkitError, match=r"w1: clip ratio has shape \(3, 1\), expected \(7, "):
        rtn_quantize(w, scheme, clip_ratio=torch.ones(3, 1), name="w1")


def test_group_size_not_dividing_columns_names_tensor():
    with pytest.raises(WeightkitError, match=r"layers\.0\.q_proj\.weight.*group size 32 does not divide.*48"):
        compute_qparams(torch.randn(4, 48), QuantScheme(4, 32), name="layers.0.q_proj.weight")
    with pytest.raises(WeightkitError, match="mlp.weight"):
        rtn_quantize(torch.randn(4, 48), QuantScheme(4, 32), name="mlp.weight")
    with pytest.raises(WeightkitError, match="2-D"):
        compute_qparams(torch.randn(4, 4, 4), QuantScheme(4, None))


def test_bad_clip_ratio_refused():
    w = torch.randn(4, 16)
    with pytest.raises(WeightkitError, match="w1.*shape"):
        compute_qparams(w, QuantScheme(4, 8), clip_ratio=torch.ones(4, 1), name="w1")
    with pytest.raises(WeightkitError, match=r"\(0, 1\]"):
        compute_qparams(w, QuantScheme(4, 8), clip_ratio=1.5)


def test_scheme_validation():
    with pytest.raises(WeightkitError, match="bits"):
        QuantScheme(bits=9)
    with pytest.raises(WeightkitError, match="group_size"):
        QuantScheme(group_size=0)
