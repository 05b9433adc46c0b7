"""Tests for the pruning masks, magnitude/random/Wanda pruning and the sparsity setting."""

import pytest
import torch

from weightkit.compress.prune.core import layer_mask, nm_mask, parse_sparsity, row_mask
from weightkit.compress.prune.magnitude import MagnitudeConfig, magnitude_prune
from weightkit.compress.prune.random import RandomConfig
from weightkit.compress.prune.wanda import WandaConfig, wanda_prune
from weightkit.errors import WeightkitError


def test_nm_mask_zeroes_the_n_smallest_of_every_m_consecutive_weights():
    scores = torch.randn(7, 24).abs()
    mask = nm_mask(scores, 2, 4)
    for r in range(7):
        for g in range(0, 24, 4):
            block = scores[r, g : g + 4]
            expected = torch.zeros(4, dtype=torch.bool)
            expected[block.argsort()[:2]] = True
            assert torch.equal(mask[r, g : g + 4], expected)


def test_row_and_layer_masks_zero_the_lowest_scores_of_their_group():
    scores = torch.randn(5, 10)
    rows = row_mask(scores, 0.3)
    assert (rows.sum(dim=1) == 3).all()
    for r in range(5):  # every pruned score is below every kept one of its row
        assert scores[r][rows[r]].max() < scores[r][~rows[r]].min()
    layer = layer_mask(scores, 0.3)
    assert int(layer.sum()) == 15 and scores[layer].max() < scores[~layer].min()


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "1:0", "4:4", "5:4", "0:4", "2-4", "half", True])
def test_bad_sparsity_is_refused(value):
    with pytest.raises(WeightkitError, match="sparsity"):
        MagnitudeConfig(sparsity=value)


def test_sparsity_parses_fractions_and_n_m():
    assert parse_sparsity(0.5) == (0.5, None)
    assert parse_sparsity("0.25") == (0.25, None)
    assert parse_sparsity("4:8") == (0.5, (4, 8))


@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
def test_n_m_pruning_leaves_at_least_n_zeros_in_every_m_weights_of_a_row(sparsity):
    n, m = parse_sparsity(sparsity)[1]
    w = torch.randn(16, 64)
    for pruned in (
        magnitude_prune(w, MagnitudeConfig(sparsity=sparsity)),
        RandomConfig(sparsity=sparsity).prune_weight(w, "layer"),
        wanda_prune(w, torch.rand(64), WandaConfig(sparsity=sparsity)),
    ):
        zeros = (pruned == 0).reshape(16, 64 // m, m).sum(dim=-1)
        assert (zeros >= n).all()
        kept = pruned != 0
        assert torch.equal(pruned[kept], w[kept])  # no update: the kept weights are the originals


def test_magnitude_unstructured_zeroes_the_smallest_fraction_of_the_layer():
    w = torch.randn(8, 32)
    pruned = magnitude_prune(w, MagnitudeConfig(sparsity=0.5))
    zero = pruned == 0
    assert int(zero.sum()) == 128
    assert w[zero].abs().max() < w[~zero].abs().min()


def test_random_keeps_exactly_the_requested_fraction_and_is_seed_deterministic():
    w = torch.randn(10, 30)
    config = RandomConfig(sparsity=0.3, seed=4)
    a, b = (
        config.prune_weight(w, "model.layers.0.mlp.up_proj"),
        config.prune_weight(w, "model.layers.0.mlp.up_proj"),
    )
    assert torch.equal(a, b)
    assert int((a == 0).sum()) == 90  # floor(0.3 * 300)
    other_seed = RandomConfig(sparsity=0.3, seed=5).prune_weight(w, "model.layers.0.mlp.up_proj")
    other_layer = config.prune_weight(w, "model.layers.1.mlp.up_proj")
    assert not torch.equal(a == 0, other_seed == 0) and not torch.equal(a == 0, other_layer == 0)


def test_random_masks_are_uniform():
    """Over many layers' masks, each position is pruned about as often as the fraction says."""
    w = torch.ones(4, 8)
    hits = sum((RandomConfig(sparsity=0.5).prune_weight(w, f"l{i}") == 0).float() for i in range(2000))
    assert ((hits / 2000 - 0.5).abs() < 0.05).all()


def test_wanda_prunes_per_row_by_weight_times_input_norm():
    w = torch.randn(6, 12)
    x = torch.randn(50, 12) * torch.linspace(0.1, 5, 12)
    pruned = wanda_prune(w, x.square().sum(dim=0), WandaConfig(sparsity=0.5))
    score = w.abs() * x.norm(dim=0)  # the paper's |W_ij| * ||X_j||_2
    for r in range(6):
        zero = pruned[r] == 0
        assert int(zero.sum()) == 6
        assert score[r][zero].max() < score[r][~zero].min()
