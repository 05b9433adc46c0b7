"""Tests for weightkit.compress.quant.awq: the scale search and the clipping search."""

import pytest
import torch

from weightkit.compress.quant import awq
from weightkit.compress.quant.awq import (
    awq_scales,
    awq_search_clip,
    awq_search_scales,
    clip_ratios,
    even_sample,
)
from weightkit.compress.quant.hessian import Hessian
from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantScheme, compute_qparams, dequantize, quantize_to_grid, rtn_quantize


def outlier_inputs(tokens, features, seed, n_outliers=4):
    """Gaussian activations with a few channels 10-50x larger, as in LLM hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    idx = torch.randperm(features, generator=g)[:n_outliers]
    x[:, idx] *= torch.empty(n_outliers).uniform_(10, 50, generator=g)
    return x, g


def rtn(w, scheme, clip=None):
    return rtn_quantize(w, scheme, clip_ratio=clip).dequantize()


def output_error(x, w, w_hat):
    return float((x @ (w - w_hat).T).norm())


def search_scales(x, weights, scheme, **kwargs):
    """weightkit's search, fed the statistics a driver accumulates from the tokens ``x``."""
    stats = Hessian()
    stats.add(x)
    h = stats.value()
    return awq_search_scales(h, x.abs().mean(dim=0), weights, scheme, **kwargs)


def search_scales_reference(x, weights, scheme, n_grid, output_fn):
    """Plain loop over the paper's grid: s = mean|x|^alpha / sqrt(max * min), candidates RTN(W s) / s,
    loss = mean squared error of the outputs over the tokens."""
    magnitude = torch.stack([x[:, j].abs().mean() for j in range(x.shape[1])])
    ref = output_fn(x, weights)
    best = (float("inf"), None, None)
    for i in range(n_grid):
        alpha = i / n_grid
        s = torch.stack([max(float(m) ** alpha, 1e-4) * torch.ones(()) for m in magnitude])
        s = s / torch.sqrt(s.max() * s.min())
        candidates = [rtn(w * s, scheme) / s for w in weights]
        loss = float(((output_fn(x, candidates) - ref) ** 2).mean())
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1]


def concat_outputs(x, weights):
    return torch.cat([x @ w.T for w in weights], dim=1)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 16, True), QuantScheme(3, None, False)], ids=str)
def test_scale_search_matches_loop_reference(scheme):
    x, g = outlier_inputs(64, 32, seed=0)
    weights = [torch.randn(n, 32, generator=g) for n in (16, 8, 8)]
    scales, alpha = search_scales(x, weights, scheme, n_grid=10)
    ref_scales, ref_alpha = search_scales_reference(x, weights, scheme, 10, concat_outputs)
    assert alpha == ref_alpha and alpha > 0
    torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=0)
    assert scales.shape == (32,) and scales.dtype == torch.float32


def test_hessian_loss_equals_token_loss():
    x, g = outlier_inputs(200, 32, seed=1)
    delta = torch.randn(8, 32, generator=g, dtype=torch.float64)
    stats = Hessian(torch.float64)
    stats.add(x.double())
    h = stats.value()
    per_token = ((x.double() @ delta.T) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(awq.output_error(delta, h), 2 * per_token)


def test_alpha_zero_is_plain_rtn():
    m = torch.rand(32) * 10
    assert torch.equal(awq_scales(m, 0.0), torch.ones(32))
    x, g = outlier_inputs(64, 32, seed=2)
    w = torch.randn(16, 32, generator=g)
    scheme = QuantScheme(4, 16, False)
    scales, alpha = search_scales(x, [w], scheme, n_grid=1)  # only alpha = 0 is tried
    assert alpha == 0.0 and torch.equal(scales, torch.ones(32))
    assert torch.equal(rtn(w * scales, scheme) / scales, rtn(w, scheme))


def test_scales_are_normalised_and_follow_activation_size():
    m = torch.tensor([0.5, 1.0, 4.0, 0.0])
    s = awq_scales(m, 0.5)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    assert s[2] > s[1] > s[0] > s[3] > 0  # a dead channel gets the floor, not zero


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 32), QuantScheme(3, 32, False), QuantScheme(4, None)], ids=str
)
def test_awq_beats_rtn_with_outlier_channels(scheme):
    for seed in range(3):
        x, g = outlier_inputs(512, 128, seed=seed)
        w = torch.randn(64, 128, generator=g)
        scales, alpha = search_scales(x, [w], scheme)
        err_awq = output_error(x, w, rtn(w * scales, scheme) / scales)
        err_rtn = output_error(x, w, rtn(w, scheme))
        assert alpha > 0
        assert err_awq < 0.9 * err_rtn, (seed, err_awq, err_rtn)  # measured 0.43-0.83


def test_search_never_worse_than_rtn_on_its_objective():
    # No outliers at all: whatever alpha wins, the calibration loss is at most RTN's.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    scheme = QuantScheme(4, 32)
    scales, _ = search_scales(x, [w], scheme)
    assert output_error(x, w, rtn(w * scales, scheme) / scales) <= output_error(x, w, rtn(w, scheme))


def group_errors(w, x, scheme, clip):
    """Loop reference: error of each (row, group) from its own input columns, mean over tokens."""
    w_hat = rtn(w, scheme, clip)
    group = scheme.group_size or w.shape[1]
    err = torch.empty(w.shape[0], w.shape[1] // group)
    for r in range(w.shape[0]):
        for gi in range(err.shape[1]):
            cols = slice(gi * group, (gi + 1) * group)
            err[r, gi] = ((x[:, cols] @ (w[r, cols] - w_hat[r, cols])) ** 2).mean()
    return err


def heavy_tailed(rows, cols, g):
    """Student-t weights with 2 degrees of freedom: z / sqrt(chi2_2 / 2); a few huge entries per row."""
    z = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(rows, cols, generator=g) ** 2 + torch.randn(rows, cols, generator=g) ** 2
    return 0.02 * z / (chi2 / 2).sqrt()


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 16, True), QuantScheme(3, 16, False), QuantScheme(4, None)], ids=str
)
def test_clip_search_matches_loop_reference_and_never_hurts(scheme):
    x, g = outlier_inputs(96, 64, seed=3)
    w = heavy_tailed(12, 64, g)
    ratio = awq_search_clip(w, x, scheme, n_grid=10, max_shrink=0.5)
    groups = 64 // (scheme.group_size or 64)
    assert ratio.shape == (12, groups) and ratio.dtype == torch.float32
    # Loop reference: per (row, group), the first ratio with the smallest error.
    candidates = clip_ratios(10, 0.5)
    assert candidates[0] == 1.0 and candidates[-1] == pytest.approx(0.5) and len(candidates) == 6
    errs = torch.stack([group_errors(w, x, scheme, torch.full((12, groups), r)) for r in candidates])
    best = errs.argmin(dim=0)
    ref = torch.tensor(candidates)[best]
    # Ties between ratios (equal errors in float) are the only place the two may differ.
    chosen_err = group_errors(w, x, scheme, ratio)
    torch.testing.assert_close(chosen_err, errs.min(dim=0).values, rtol=1e-4, atol=1e-9)
    assert (ratio == ref).float().mean() > 0.95
    # Never worse than no clipping, and strictly better overall on heavy-tailed weights.
    no_clip = group_errors(w, x, scheme, None)
    assert bool((chosen_err <= no_clip * (1 + 1e-5)).all())
    assert float(chosen_err.sum()) < 0.9 * float(no_clip.sum())
    assert bool((ratio < 1).any())


def test_clip_search_chunks_rows_and_subsamples_tokens(monkeypatch):
    x, g = outlier_inputs(300, 64, seed=4)
    w = heavy_tailed(20, 64, g)
    scheme = QuantScheme(4, 16)
    whole = awq_search_clip(w, x, scheme)
    monkeypatch.setattr(awq, "_CLIP_CHUNK_ELEMENTS", 3 * 4 * 300)  # 3 rows per chunk
    assert torch.equal(awq_search_clip(w, x, scheme), whole)
    # Subsampling keeps evenly spaced tokens, first and last included.
    idx = even_sample(300, 100)
    assert idx[0] == 0 and idx[-1] == 299 and len(idx) == 100 and bool((idx.diff() >= 2).all())
    assert torch.equal(even_sample(50, 100), torch.arange(50))
    assert torch.equal(awq_search_clip(w, x, scheme, n_sample_tokens=100), awq_search_clip(w, x[idx], scheme))


def test_clip_ratios_feed_rtn_consistently():
    x, g = outlier_inputs(128, 64, seed=6)
    w = heavy_tailed(16, 64, g)
    scheme = QuantScheme(4, 32, False)
    ratio = awq_search_clip(w, x, scheme)
    scale, zero = compute_qparams(w, scheme, clip_ratio=ratio)
    w_hat = dequantize(quantize_to_grid(w, scale, zero, scheme), scale, zero)
    assert torch.equal(w_hat, rtn(w, scheme, ratio))
    assert output_error(x, w, w_hat) < output_error(x, w, rtn(w, scheme))


def test_bad_input_raises_naming_tensor():
    scheme = QuantScheme(4, 16)
    with pytest.raises(WeightkitError, match=r"qkv\[1\].*does not read"):
        search_scales(torch.randn(8, 32), [torch.randn(4, 32), torch.randn(4, 16)], scheme, name="qkv")
    with pytest.raises(WeightkitError, match="NaN"):
        search_scales(torch.full((8, 32), float("nan")), [torch.randn(4, 32)], scheme)
    with pytest.raises(WeightkitError, match="Hessian has shape"):
        awq_search_scales(torch.eye(16), torch.ones(32), [torch.randn(4, 32)], scheme)
    with pytest.raises(WeightkitError, match="o_proj.*16"):
        awq_search_clip(torch.randn(4, 32), torch.randn(8, 16), scheme, name="o_proj")
    with pytest.raises(WeightkitError, match="max_shrink"):
        awq_search_clip(torch.randn(4, 32), torch.randn(8, 32), scheme, max_shrink=1.0)
    with pytest.raises(WeightkitError, match="down.*group size 16"):
        awq_search_clip(torch.randn(4, 40), torch.randn(8, 40), scheme, name="down")
