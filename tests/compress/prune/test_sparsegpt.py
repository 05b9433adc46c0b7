"""Tests for weightkit.compress.prune.sparsegpt against a plain column-by-column optimal brain surgeon."""

import pytest
import torch

from weightkit.compress.prune.magnitude import MagnitudeConfig, magnitude_prune
from weightkit.compress.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from weightkit.compress.prune.wanda import WandaConfig, wanda_prune
from weightkit.compress.quant.hessian import Hessian
from weightkit.errors import WeightkitError


def sparsegpt_reference(w, h, *, sparsity, n_m=None, damp=0.01, block_size=4):
    """SparseGPT as the paper's Algorithm 1, float64, one column at a time with an explicit inverse.

    The mask of a block (unstructured: the floor(sparsity * numel) lowest OBS saliencies ``w_c^2 / d_c``
    over the block's current weights, ``d_c = [(H_{c:, c:})^-1]_00`` the inverse Hessian's diagonal once the
    columns before c are eliminated, which is the paper's squared Cholesky diagonal) or of an N:M group is
    chosen when the sweep reaches it; visiting column j zeroes its pruned weights and moves
    ``err = w_j / [H^-1]_jj`` onto the later columns by ``-err * [H^-1]_{j, later}``; then column j is
    eliminated from ``H^-1``.
    """
    W = w.double().clone()
    H = h.double().clone()
    cols = W.shape[1]
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    hinv = torch.linalg.inv(H)
    d = torch.stack([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(cols)])
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if n_m is None and j % block_size == 0:
            block = slice(j, min(j + block_size, cols))
            saliency = (W[:, block] ** 2 / d[block]).flatten()
            k = int(sparsity * saliency.numel())
            chosen = torch.zeros_like(saliency, dtype=torch.bool)
            chosen[saliency.argsort()[:k]] = True
            mask[:, block] = chosen.reshape(W.shape[0], -1)
        if n_m is not None and j % n_m[1] == 0:
            group = slice(j, j + n_m[1])
            saliency = W[:, group] ** 2 / d[group]
            for r in range(W.shape[0]):
                mask[r, j + saliency[r].argsort()[: n_m[0]]] = True
        err = torch.where(mask[:, j], W[:, j], 0.0) / hinv[j, j]
        W[:, j] = torch.where(mask[:, j], 0.0, W[:, j])
        W[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return W


def _layer(rows=6, cols=16, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    hessian = Hessian(torch.float64)
    hessian.add(x)
    return w, hessian.value()


@pytest.mark.parametrize("n_m", [None, (2, 4), (4, 8)])
def test_sparsegpt_matches_the_column_by_column_reference(n_m):
    w, h = _layer()
    got = sparsegpt_prune(w, h, sparsity=0.5, n_m=n_m, block_size=8)
    want = sparsegpt_reference(w, h, sparsity=0.5, n_m=n_m, block_size=8)
    assert torch.equal(got == 0, want == 0)
    assert torch.allclose(got, want, atol=1e-9)


def test_stacked_layers_choose_their_masks_apart():
    """Rows of two layers in one sweep equal two separate sweeps (per-layer comparison groups)."""
    w, h = _layer(rows=10)
    stacked = sparsegpt_prune(w, h, sparsity=0.5, block_size=8, row_groups=[4, 6])
    apart = torch.cat([sparsegpt_prune(part, h, sparsity=0.5, block_size=8) for part in w.split([4, 6])])
    assert torch.allclose(stacked, apart, atol=1e-12) and torch.equal(stacked == 0, apart == 0)


def test_sparsegpt_refuses_a_block_size_that_splits_n_m_groups():
    with pytest.raises(WeightkitError, match="block_size"):
        SparseGPTConfig(sparsity="4:8", block_size=12)
    w, h = _layer()
    with pytest.raises(WeightkitError, match="multiples of 8"):
        sparsegpt_prune(w, h, sparsity=0.5, n_m=(4, 8), block_size=12)


def _outlier_layer(seed=0):
    """A layer whose inputs have a few large-magnitude features (as LLM activations do) and correlated
    features (which only SparseGPT's weight update exploits)."""
    g = torch.Generator().manual_seed(seed)
    cols = 64
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[:4]] = 20.0
    mixing = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    x_fit = torch.randn(512, cols, generator=g) @ mixing * scale
    x_test = torch.randn(512, cols, generator=g) @ mixing * scale
    w = torch.randn(32, cols, generator=g)
    return w, x_fit, x_test


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_planted_activation_outliers(sparsity):
    w, x_fit, x_test = _outlier_layer()
    hessian = Hessian()
    hessian.add(x_fit)

    def error(pruned):
        return float(((w - pruned) @ x_test.T).square().mean())

    magnitude = error(magnitude_prune(w, MagnitudeConfig(sparsity=sparsity)))
    wanda = error(wanda_prune(w, x_fit.square().sum(dim=0), WandaConfig(sparsity=sparsity)))
    sparsegpt = error(
        sparsegpt_prune(
            w,
            hessian.value(),
            sparsity=SparseGPTConfig(sparsity=sparsity).fraction,
            n_m=SparseGPTConfig(sparsity=sparsity).n_m,
        )
    )
    assert wanda < 0.5 * magnitude
    assert sparsegpt < 0.8 * wanda
