"""Tests for weightkit.compress.quant.awq: the scale search and the clipping search, against plain
loops written from the reference code's definitions (llm-awq, AutoAWQ, llm-compressor)."""

import pytest
import torch

from weightkit.compress.quant import awq
from weightkit.compress.quant.awq import (
    awq_scales,
    awq_search_clip,
    awq_search_scales,
    clip_ratios,
    clip_weight,
    even_sample,
    scale_candidates,
    scaled_rtn,
    weight_magnitude,
)
from weightkit.compress.quant.hessian import Hessian
from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantScheme, rtn_quantize


def outlier_inputs(tokens, features, seed, n_outliers=4):
    """Gaussian activations with a few channels 10-50x larger, as in LLM hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    idx = torch.randperm(features, generator=g)[:n_outliers]
    x[:, idx] *= torch.empty(n_outliers).uniform_(10, 50, generator=g)
    return x, g


def rtn(w, scheme):
    return rtn_quantize(w, scheme).dequantize()


def output_error(x, w, w_hat):
    return float((x @ (w - w_hat).T).norm())


def search_scales(x, weights, schemes, **kwargs):
    """weightkit's search, fed the statistics a driver accumulates from the tokens ``x``."""
    stats = Hessian()
    stats.add(x)
    return awq_search_scales(stats.value(), x.abs().mean(dim=0), weights, schemes, **kwargs)


def weight_magnitude_reference(weights, schemes):
    """Loop: for every input column, the mean over all rows of all weights of |w| / (max|w| + 1e-6),
    the max over the entry's quantization group."""
    cols = weights[0].shape[1]
    total, rows = [0.0] * cols, 0
    for w, scheme in zip(weights, schemes, strict=True):
        group = scheme.group_size or cols
        for r in range(w.shape[0]):
            for c in range(cols):
                start = c // group * group
                peak = max(abs(float(v)) for v in w[r, start : start + group])
                total[c] += abs(float(w[r, c])) / (peak + 1e-6)
        rows += w.shape[0]
    return torch.tensor([t / rows for t in total])


def scales_reference(x_mean, alpha, w_mean=None):
    """llm-compressor's formula, one channel at a time."""
    s = []
    for j in range(len(x_mean)):
        v = float(x_mean[j]) ** alpha
        if w_mean is not None:
            v = v / (float(w_mean[j]) ** (1 - alpha) + 1e-4)
        s.append(max(v, 1e-4))
    s = torch.tensor(s)
    return s / (s.max() * s.min()).sqrt()


def grid_reference(n_grid, duo):
    """llm-compressor's _get_grid_search_params: (alpha, duo) pairs."""
    if duo:
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    return [(i / (n_grid - 1), False) for i in range(n_grid)]


def search_scales_reference(x, weights, schemes, n_grid, duo):
    """Plain loop over the grid: candidates RTN(W s) / s, loss = mean squared error of the
    concatenated outputs over the tokens; the first of equal losses wins."""
    x_mean = x.abs().mean(dim=0)  # as the driver computes it: the rounding is sensitive to its last bit
    w_mean = weight_magnitude_reference(weights, schemes) if duo else None
    ref = torch.cat([x @ w.T for w in weights], dim=1)
    best = (float("inf"), None)
    for alpha, use_duo in grid_reference(n_grid, duo):
        s = scales_reference(x_mean, alpha, w_mean if use_duo else None)
        out = torch.cat(
            [x @ (rtn(w * s, scheme) / s).T for w, scheme in zip(weights, schemes, strict=True)], 1
        )
        loss = float(((out - ref) ** 2).mean())
        if loss < best[0]:
            best = (loss, (alpha, use_duo, s))
    return best[1]


def test_weight_magnitude_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 16, generator=g), torch.randn(3, 16, generator=g) * 5]
    schemes = [QuantScheme(4, 8), QuantScheme(8, None)]  # a per-layer override: other groups
    torch.testing.assert_close(
        weight_magnitude(weights, schemes), weight_magnitude_reference(weights, schemes)
    )


def test_scale_candidates_are_llm_compressors_grid_and_formula():
    g = torch.Generator().manual_seed(1)
    x_mean, w_mean = torch.rand(12, generator=g) * 3, torch.rand(12, generator=g)
    for duo in (True, False):
        got = scale_candidates(x_mean, w_mean if duo else None, n_grid=7)
        assert [(c.alpha, c.duo) for c in got] == grid_reference(7, duo)
        for c in got:
            torch.testing.assert_close(c.scales, scales_reference(x_mean, c.alpha, w_mean if c.duo else None))
    assert torch.equal(scale_candidates(x_mean, w_mean, n_grid=5)[0].scales, torch.ones(12))  # identity first
    with pytest.raises(WeightkitError, match="n_grid"):
        scale_candidates(x_mean, None, n_grid=2)


@pytest.mark.parametrize("duo", [True, False])
@pytest.mark.parametrize(
    "schemes", [[QuantScheme(4, 16, True)] * 3, [QuantScheme(3, None, False)] * 3], ids=str
)
def test_scale_search_matches_loop_reference(schemes, duo):
    x, g = outlier_inputs(64, 32, seed=0)
    weights = [torch.randn(n, 32, generator=g) for n in (16, 8, 8)]
    got = search_scales(x, weights, schemes, n_grid=10, duo_scaling=duo)
    alpha, use_duo, scales = search_scales_reference(x, weights, schemes, 10, duo)
    assert (got.alpha, got.duo) == (alpha, use_duo) and alpha > 0
    torch.testing.assert_close(got.scales, scales, rtol=1e-5, atol=0)
    assert got.scales.shape == (32,) and got.scales.dtype == torch.float32


def test_scale_search_quantizes_each_weight_with_its_own_grid():
    # A per-layer override (8 bits for the second weight) must be the grid its candidates are rounded
    # on; searching with one grid for both would pick other scales here.
    x, g = outlier_inputs(64, 32, seed=7)
    weights = [torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)]
    mixed = [QuantScheme(3, 16), QuantScheme(8, 16)]
    got = search_scales(x, weights, mixed, n_grid=10)
    assert (got.alpha, got.duo) == search_scales_reference(x, weights, mixed, 10, True)[:2]


def test_hessian_loss_equals_token_loss():
    x, g = outlier_inputs(200, 32, seed=1)
    delta = torch.randn(8, 32, generator=g, dtype=torch.float64)
    stats = Hessian(torch.float64)
    stats.add(x.double())
    per_token = ((x.double() @ delta.T) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(awq.output_error(delta, stats.value()), 2 * per_token)


def test_identity_candidate_is_plain_rtn():
    m = torch.rand(32) * 10
    assert torch.equal(awq_scales(m, 0.0), torch.ones(32))
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=g)
    scheme = QuantScheme(4, 16, False)
    torch.testing.assert_close(scaled_rtn(w, torch.ones(32), scheme), rtn(w, scheme), rtol=0, atol=0)


def test_scales_are_normalised_and_follow_activation_size():
    m = torch.tensor([0.5, 1.0, 4.0, 0.0])
    s = awq_scales(m, 0.5)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    assert s[2] > s[1] > s[0] > s[3] > 0  # a dead channel gets the floor, not zero
    live = m[:3]  # equal weight magnitudes: the same relative scales (the floor aside)
    torch.testing.assert_close(awq_scales(live, 0.5, torch.full((3,), 0.5)), awq_scales(live, 0.5))


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 32), QuantScheme(3, 32, False), QuantScheme(4, None)], ids=str
)
def test_awq_beats_rtn_with_outlier_channels(scheme):
    for seed in range(3):
        x, g = outlier_inputs(512, 128, seed=seed)
        w = torch.randn(64, 128, generator=g)
        best = search_scales(x, [w], [scheme])
        err_awq = output_error(x, w, scaled_rtn(w, best.scales, scheme))
        err_rtn = output_error(x, w, rtn(w, scheme))
        assert best.alpha > 0
        assert err_awq < 0.9 * err_rtn, (seed, err_awq, err_rtn)


def test_search_never_worse_than_rtn_on_its_objective():
    # No outliers at all: whatever wins, the calibration loss is at most RTN's.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    scheme = QuantScheme(4, 32)
    for duo in (True, False):
        best = search_scales(x, [w], [scheme], duo_scaling=duo)
        assert output_error(x, w, scaled_rtn(w, best.scales, scheme)) <= output_error(x, w, rtn(w, scheme))


def clip_reference(w, ratios, scheme):
    """Loop: clamp every entry to +-ratio * max|w| of its (row, group), as the reference's apply_clip."""
    group = scheme.group_size or w.shape[1]
    out = w.clone()
    for r in range(w.shape[0]):
        for gi in range(w.shape[1] // group):
            cols = slice(gi * group, (gi + 1) * group)
            limit = float(ratios[r, gi]) * float(w[r, cols].abs().max())
            out[r, cols] = w[r, cols].clamp(-limit, limit)
    return out


def group_errors(w, x, scheme, ratios):
    """Loop reference: error of each (row, group) from its own input columns, mean over tokens."""
    w_hat = rtn(clip_reference(w, ratios, scheme), scheme)
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


def test_clip_grid_is_the_references():
    # llm-awq / AutoAWQ: for i_s in range(int(max_shrink * n_grid)): 1 - i_s / n_grid.
    assert clip_ratios(20, 0.5) == pytest.approx([1 - i / 20 for i in range(10)])
    assert clip_ratios(20, 0.5)[-1] == pytest.approx(0.55)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 8, True), QuantScheme(3, 8, False)], ids=str)
def test_clip_weight_matches_loop_reference(scheme):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(4, 16, generator=g) + 0.5  # skewed: an asymmetric grid keeps its short end
    ratios = torch.rand(4, 2, generator=g) * 0.5 + 0.5
    torch.testing.assert_close(clip_weight(w, ratios, scheme), clip_reference(w, ratios, scheme))


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 16, True), QuantScheme(3, 16, False), QuantScheme(4, None)], ids=str
)
def test_clip_search_matches_loop_reference_and_never_hurts(scheme):
    x, g = outlier_inputs(96, 64, seed=3)
    w = heavy_tailed(12, 64, g)
    ratio = awq_search_clip(w, x, scheme, n_grid=10, max_shrink=0.5)
    groups = 64 // (scheme.group_size or 64)
    assert ratio.shape == (12, groups) and ratio.dtype == torch.float32
    candidates = clip_ratios(10, 0.5)
    assert candidates == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    errs = torch.stack([group_errors(w, x, scheme, torch.full((12, groups), r)) for r in candidates])
    ref = torch.tensor(candidates)[errs.argmin(dim=0)]
    # Ties between ratios (equal errors in float) are the only place the two may differ.
    chosen_err = group_errors(w, x, scheme, ratio)
    torch.testing.assert_close(chosen_err, errs.min(dim=0).values, rtol=1e-4, atol=1e-9)
    assert (ratio == ref).float().mean() > 0.95
    # Never worse than no clipping, and strictly better overall on heavy-tailed weights.
    no_clip = group_errors(w, x, scheme, torch.ones(12, groups))
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


def test_bad_input_raises_naming_tensor():
    scheme = QuantScheme(4, 16)
    with pytest.raises(WeightkitError, match=r"qkv\[1\].*does not read"):
        search_scales(torch.randn(8, 32), [torch.randn(4, 32), torch.randn(4, 16)], [scheme] * 2, name="qkv")
    with pytest.raises(WeightkitError, match="NaN"):
        search_scales(torch.full((8, 32), float("nan")), [torch.randn(4, 32)], [scheme])
    with pytest.raises(WeightkitError, match="Hessian has shape"):
        awq_search_scales(torch.eye(16), torch.ones(32), [torch.randn(4, 32)], [scheme])
    with pytest.raises(WeightkitError, match="one scheme per weight"):
        awq_search_scales(torch.eye(32), torch.ones(32), [torch.randn(4, 32)], [scheme] * 2)
    with pytest.raises(WeightkitError, match="o_proj.*16"):
        awq_search_clip(torch.randn(4, 32), torch.randn(8, 16), scheme, name="o_proj")
    with pytest.raises(WeightkitError, match="max_shrink"):
        awq_search_clip(torch.randn(4, 32), torch.randn(8, 32), scheme, max_shrink=1.0)
    with pytest.raises(WeightkitError, match="down.*group size 16"):
        awq_search_clip(torch.randn(4, 40), torch.randn(8, 40), scheme, name="down")
