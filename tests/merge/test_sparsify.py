"""Tests for weightkit.merge.sparsify: TIES trim, DARE, Breadcrumbs and DELLA, each against its rule.

Each function is compared with the paper's rule written out entry by entry in Python (sorted lists for
ranks), and the random sparsifiers with the Bernoulli draws of an identically seeded generator and with
their expected values over many draws.
"""

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.sparsify import breadcrumbs_prune, della_prune, magnitude_prune, random_drop


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- references


def trim_reference(delta, density):
    """TIES trim: keep the int(density * n) entries of largest |value|."""
    values = [float(v) for v in delta.reshape(-1)]
    k = int(density * len(values))
    # Largest first; among equal magnitudes the lower index first.
    keep = set(sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))[:k])
    out = [v if i in keep else 0.0 for i, v in enumerate(values)]
    return torch.tensor(out, dtype=delta.dtype).reshape(delta.shape)


def breadcrumbs_reference(delta, density, gamma):
    """Drop the n_top largest and n_bottom smallest |values| (mergekit's counts); keep the band between."""
    values = [float(v) for v in delta.reshape(-1)]
    n = len(values)
    n_keep, n_top = int(density * n), int(gamma * n)
    n_bottom = n - n_keep - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    # Among equal magnitudes the lower index ranks higher (sorts later in increasing order).
    ascending = sorted(range(n), key=lambda i: (abs(values[i]), -i))
    keep = set(ascending[n_bottom : n - n_top])
    out = [v if i in keep else 0.0 for i, v in enumerate(values)]
    return torch.tensor(out, dtype=delta.dtype).reshape(delta.shape), keep


def della_probabilities_reference(rows, density, epsilon):
    """Keep probability of every entry: density - eps for the smallest |value| of its row, rising
    linearly with rank to density + eps for the largest."""
    probs = []
    for row in rows.tolist():
        n = len(row)
        rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: (abs(row[i]), -i)))}
        probs.append(
            [density if n == 1 else density - epsilon + 2 * epsilon * rank[i] / (n - 1) for i in range(n)]
        )
    return torch.tensor(probs, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- TIES trim


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("shape", [(40,), (6, 7), (2, 3, 5)])
def test_magnitude_prune_keeps_the_largest(density, shape):
    delta = randn(*shape, seed=1)
    got = magnitude_prune(delta, density)
    assert got.shape == delta.shape
    assert torch.equal(got, trim_reference(delta, density))
    assert int((got != 0).sum()) == int(density * delta.numel())


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.7])
def test_magnitude_prune_breaks_ties_by_index(density):
    # Magnitudes 0..3 only: every cut falls inside a run of equal magnitudes (zeros included).
    delta = torch.randint(-3, 4, (50,), generator=gen(12)).float()
    got = magnitude_prune(delta, density)
    assert torch.equal(got, trim_reference(delta, density))
    nonzero_kept = int((got != 0).sum())
    assert nonzero_kept == min(int(density * 50), int((delta != 0).sum()))


@pytest.mark.parametrize("density", [0.01, 0.37, 0.9])
def test_magnitude_prune_of_bfloat16_deltas_with_many_equal_magnitudes(density):
    # bf16-rounded values: few distinct magnitudes, so the cut lands in large runs of ties, and float32
    # magnitudes take the bucket-count selection path.
    delta = (torch.randn(20_000, generator=gen(3)) * torch.logspace(-6, 0, 20_000)).bfloat16().float()
    assert delta.dtype == torch.float32
    got = magnitude_prune(delta, density)
    assert torch.equal(got, trim_reference(delta, density))


def test_magnitude_prune_edge_densities():
    delta = randn(5, 4, seed=2)
    assert magnitude_prune(delta, 1.0) is delta
    assert magnitude_prune(delta, 1.5) is delta
    # int(0.01 * 20) == 0 entries to keep.
    assert torch.equal(magnitude_prune(delta, 0.01), torch.zeros_like(delta))
    with pytest.raises(WeightkitError, match="density"):
        magnitude_prune(delta, 0.0)


# ---------------------------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_drop_keeps_the_entries_whose_uniform_draw_is_below_density(density):
    delta = randn(8, 9, seed=3)
    got = random_drop(delta, density, gen(42))
    mask = torch.rand(delta.shape, generator=gen(42)) < density
    assert torch.equal(got != 0, mask)
    for j, (g, d, m) in enumerate(zip(got.reshape(-1), delta.reshape(-1), mask.reshape(-1), strict=True)):
        expected = float(d) / density if m else 0.0
        assert abs(float(g) - expected) <= 1e-6 * abs(expected), j


def test_random_drop_is_unbiased_and_keeps_density():
    delta = randn(4, 5, seed=4)
    density, draws = 0.3, 4000
    generator = gen(0)
    total = torch.zeros(4, 5, dtype=torch.float64)
    for _ in range(draws):
        total += random_drop(delta, density, generator)
    # Relative standard error sqrt((1 - p) / (p * draws)) = 2.4%: 12% is 5 standard errors.
    assert torch.allclose(total / draws, delta.double(), rtol=0.12, atol=0.0)
    big = random_drop(torch.ones(200_000), density, gen(1))
    assert abs(float((big != 0).double().mean()) - density) < 0.005


def test_random_drop_is_deterministic_and_leaves_input():
    delta = randn(30, seed=5)
    copy = delta.clone()
    first, second = random_drop(delta, 0.5, gen(7)), random_drop(delta, 0.5, gen(7))
    assert torch.equal(first, second)
    assert not torch.equal(first, random_drop(delta, 0.5, gen(8)))
    assert torch.equal(delta, copy)
    assert random_drop(delta, 1.0, gen(7)) is delta
    with pytest.raises(WeightkitError, match="density"):
        random_drop(delta, -0.1, gen(7))


# ---------------------------------------------------------------------------------------------- Breadcrumbs


@pytest.mark.parametrize(
    ("density", "gamma"),
    [
        (0.5, 0.1),  # 4 outliers and 16 small entries dropped out of 40
        (0.9, 0.2),  # density + gamma > 1: only 4 outliers can go
        (0.5, 0.01),  # int(0.4) = 0 outliers: the band reaches the top
        (0.3, 0.0),
        (0.6, 0.4),  # nothing small is dropped
    ],
)
def test_breadcrumbs_keeps_exactly_the_middle_band(density, gamma):
    delta = randn(5, 8, seed=6)
    expected, keep = breadcrumbs_reference(delta, density, gamma)
    got = breadcrumbs_prune(delta, density, gamma)
    assert torch.equal(got, expected)
    kept = {i for i, v in enumerate(got.reshape(-1).tolist()) if v != 0}
    assert kept == keep and len(kept) == int(density * delta.numel())


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.3, 0.2), (0.8, 0.1), (0.2, 0.3)])
def test_breadcrumbs_breaks_ties_by_index(density, gamma):
    delta = torch.randint(-3, 4, (6, 10), generator=gen(13)).float()
    expected, _ = breadcrumbs_reference(delta, density, gamma)
    assert torch.equal(breadcrumbs_prune(delta, density, gamma), expected)


def test_breadcrumbs_drops_the_largest_entries():
    delta = torch.tensor([0.1, -5.0, 0.3, 0.2, -0.4, 4.0, 0.05, 0.6, -0.7, 0.8])
    got = breadcrumbs_prune(delta, 0.5, 0.2)
    # Outliers -5 and 4 and the three smallest (0.05, 0.1, 0.2) go; the middle five stay.
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.3, 0.0, -0.4, 0.0, 0.0, 0.6, -0.7, 0.8]))


def test_breadcrumbs_validation():
    delta = randn(10, seed=7)
    assert breadcrumbs_prune(delta, 1.0, 0.1) is delta
    with pytest.raises(WeightkitError, match="gamma"):
        breadcrumbs_prune(delta, 0.5, 1.5)
    with pytest.raises(WeightkitError, match="density"):
        breadcrumbs_prune(delta, 0.0, 0.1)


# ---------------------------------------------------------------------------------------------- DELLA


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.2), (0.3, 0.1), (0.75, 0.25), (0.6, 0.0)])
@pytest.mark.parametrize("shape", [(6, 9), (11,), (3, 2, 4), (5, 1)])
def test_della_mask_and_rescaling_follow_the_rank_rule(shape, density, epsilon):
    delta = randn(*shape, seed=8)
    rows = delta.reshape(1, -1) if delta.dim() == 1 else delta.reshape(shape[0], -1)
    probs = della_probabilities_reference(rows, density, epsilon)
    mask = torch.rand(probs.shape, generator=gen(3)) < probs.float()
    got = della_prune(delta, density, epsilon, gen(3)).reshape(rows.shape)
    assert torch.equal(got != 0, mask)
    expected = torch.where(mask, rows.double() / probs, 0.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0.0)


def test_della_breaks_ties_by_index():
    delta = torch.randint(-2, 3, (4, 12), generator=gen(14)).float()
    probs = della_probabilities_reference(delta, 0.5, 0.3)
    mask = torch.rand(probs.shape, generator=gen(5)) < probs.float()
    got = della_prune(delta, 0.5, 0.3, gen(5))
    torch.testing.assert_close(
        got.double(), torch.where(mask, delta.double() / probs, 0.0), rtol=1e-6, atol=0.0
    )


def test_della_keep_frequency_grows_with_rank_and_is_unbiased():
    # 20000 identical rows: each column's keep frequency estimates its rank's keep probability.
    row = torch.tensor([0.5, -3.0, 0.1, 2.0, -1.0])
    delta = row.repeat(20_000, 1)
    density, epsilon = 0.5, 0.3
    got = della_prune(delta, density, epsilon, gen(11))
    frequency = (got != 0).double().mean(dim=0)
    expected = della_probabilities_reference(row[None], density, epsilon)[0]
    # Ranks of |row|: 0.5 -> 1, 3.0 -> 4, 0.1 -> 0, 2.0 -> 3, 1.0 -> 2.
    torch.testing.assert_close(expected, torch.tensor([0.35, 0.8, 0.2, 0.65, 0.5], dtype=torch.float64))
    # Standard error at most sqrt(0.25 / 20000) = 0.0035.
    assert (frequency - expected).abs().max() < 0.02
    assert (got.double().mean(dim=0) - row.double()).abs().max() < 0.06


def test_della_is_deterministic_and_validates():
    delta = randn(4, 6, seed=9)
    copy = delta.clone()
    assert torch.equal(della_prune(delta, 0.5, 0.1, gen(1)), della_prune(delta, 0.5, 0.1, gen(1)))
    assert torch.equal(delta, copy)
    assert della_prune(delta, 1.0, 0.1, gen(1)) is delta
    for density, epsilon in [(0.2, 0.2), (0.9, 0.15), (0.5, -0.1), (0.0, 0.0)]:
        with pytest.raises(WeightkitError, match="density|epsilon"):
            della_prune(delta, density, epsilon, gen(1))


def test_della_with_keep_probability_one_keeps_the_largest_unscaled():
    delta = torch.tensor([[0.1, 0.9, -0.5], [2.0, -0.2, 0.3]])
    got = della_prune(delta, 0.75, 0.25, gen(2))
    # The largest entry of each row has probability 1: always kept, divided by 1.
    assert float(got[0, 1]) == pytest.approx(0.9) and float(got[1, 0]) == pytest.approx(2.0)
