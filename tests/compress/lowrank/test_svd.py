"""Truncated SVD with one global budget: the factors against a plain SVD, the allocation against a plain
greedy loop, the budget counted exactly, the refusals, and the model's error against the ratio."""

import pytest
import torch

from weightkit.compress import SVDConfig, compress
from weightkit.compress.lowrank import allocate_ranks, kept_parameters, truncated_factors
from weightkit.errors import WeightkitError
from weightkit.quantized.lowrank import LowRankLinear
from weightkit.testing import model_output, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_matrix(rows, cols, decay, seed=0):
    """A matrix with singular values ``decay ** i``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    k = min(rows, cols)
    values = decay ** torch.arange(k, dtype=torch.float64)
    return (u[:, :k] * values) @ v[:, :k].T


def test_full_rank_factors_reconstruct_the_weight():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    up, down = truncated_factors(weight, 24)
    assert up.shape == (24, 24) and down.shape == (24, 40) and up.dtype == torch.float32
    torch.testing.assert_close(up @ down, weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_truncated_factors_are_the_plain_truncated_svd_with_fixed_signs(rank):
    weight = torch.randn(16, 30, generator=torch.Generator().manual_seed(rank))
    up, down = truncated_factors(weight, rank)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    reference = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-k matrix
    torch.testing.assert_close((up @ down).double(), reference, atol=1e-5, rtol=1e-5)
    # The singular values are split evenly; each up column's largest entry is positive.
    torch.testing.assert_close(up.norm(dim=0).double(), s[:rank].sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(down.norm(dim=1).double(), s[:rank].sqrt(), atol=1e-5, rtol=1e-5)
    largest = up.gather(0, up.abs().argmax(dim=0, keepdim=True))
    assert bool((largest > 0).all())
    # The same factors for the weight with any sign convention LAPACK might pick: only the weight counts.
    again = truncated_factors(weight.clone(), rank)
    assert torch.equal(again[0], up) and torch.equal(again[1], down)


def test_factors_come_back_in_the_weights_dtype():
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    up, down = truncated_factors(weight, 3)
    assert up.dtype == down.dtype == torch.bfloat16


@pytest.mark.parametrize("rank", [0, 9])
def test_a_rank_outside_one_to_min_shape_is_refused(rank):
    with pytest.raises(WeightkitError, match=f"rank-{rank} factorisation of a \\(8, 12\\) weight"):
        truncated_factors(torch.ones(8, 12), rank)


def reference_allocation(spectra, shapes, budget):
    """The rule of svd.py's docstring as a plain loop: rank 1 each, then the worthiest next component (its
    share of its matrix's energy per m + n parameters) while the running cost stays in the budget."""
    ranks = [1] * len(spectra)
    cost = sum(min(m + n, m * n) for m, n in shapes)

    def price(j, k):
        m, n = shapes[j]
        return min(k * (m + n), m * n)

    while True:
        best, best_worth = None, -1.0
        for j, values in enumerate(spectra):
            if ranks[j] < len(values):
                energy = float((values.double() ** 2).sum())
                worth = float(values[ranks[j]].double() ** 2) / energy / sum(shapes[j])
                if worth > best_worth:
                    best, best_worth = j, worth
        if best is None:
            break
        step = price(best, ranks[best] + 1) - price(best, ranks[best])
        if cost + step > budget:
            break
        cost += step
        ranks[best] += 1
    return [min(m, n) if k * (m + n) >= m * n else k for k, (m, n) in zip(ranks, shapes, strict=True)]


@pytest.mark.parametrize("fraction", [0.15, 0.3, 0.5, 0.8, 0.95, 1.0])
def test_allocation_is_the_greedy_rule_and_meets_the_budget_exactly(fraction):
    shapes = [(16, 16), (24, 8), (8, 40), (32, 16)]
    g = torch.Generator().manual_seed(3)
    spectra = [torch.sort(torch.rand(min(s), generator=g) ** 3, descending=True).values for s in shapes]
    total = sum(m * n for m, n in shapes)
    budget = int(fraction * total)
    ranks = allocate_ranks(spectra, shapes, budget)
    assert ranks == reference_allocation(spectra, shapes, budget)
    kept = kept_parameters(ranks, shapes)
    assert kept <= budget
    # The allocation stopped at the first component that did not fit: what is left is less than one more.
    assert budget - kept < max(m + n for m, n in shapes) or all(
        k == min(s) for k, s in zip(ranks, shapes, strict=True)
    )
    if fraction == 1.0:
        assert ranks == [min(s) for s in shapes]  # everything fits dense: exact


def test_a_flatter_spectrum_gets_more_rank_at_equal_size():
    steep = torch.linalg.svdvals(random_matrix(32, 32, 0.6, seed=0)).float()
    flat = torch.linalg.svdvals(random_matrix(32, 32, 0.97, seed=1)).float()
    ranks = allocate_ranks([steep, flat], [(32, 32), (32, 32)], budget=int(0.4 * 2 * 32 * 32))
    assert ranks[1] > ranks[0] >= 1


def test_a_budget_below_rank_one_everywhere_is_refused():
    spectra = [torch.ones(8), torch.ones(4)]
    with pytest.raises(WeightkitError, match="budget of 60 parameters is below the 70"):
        allocate_ranks(spectra, [(8, 8), (4, 50)], 60)


@pytest.mark.parametrize("ratio", [0, -0.5, 1.01])
def test_a_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(WeightkitError, match=r"in \(0, 1\]"):
        SVDConfig(ratio=ratio)


def test_a_ratio_too_small_to_factor_names_the_minimum():
    # 14 layers of the tiny Llama: 18432 weight parameters, 1024 for rank 1 each.
    with pytest.raises(WeightkitError, match=r"fewer than the 1024 .* the smallest ratio is 0\.055556"):
        compress(tiny_llama(), SVDConfig(ratio=0.05), progress=False)


def test_a_ratio_that_keeps_every_layer_dense_is_refused():
    with pytest.raises(WeightkitError, match="ratio 1 leaves every selected layer dense"):
        compress(tiny_llama(), SVDConfig(ratio=1.0), progress=False)


def test_targets_selecting_nothing_are_refused():
    with pytest.raises(WeightkitError, match="no nn.Linear layer selected for SVD"):
        compress(tiny_llama(), SVDConfig(targets=["re:.*q_proj"], ignore=["re:.*proj"]), progress=False)


def test_a_tied_weight_is_refused_rather_than_untied():
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(WeightkitError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        compress(model, SVDConfig(targets=["lm_head"], ignore=[]), progress=False)


def test_nan_weights_are_refused():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(WeightkitError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*NaN"):
        compress(model, SVDConfig(), progress=False)


def test_compress_factors_the_allocated_layers_and_the_error_rises_as_the_ratio_falls():
    reference = model_output(tiny_llama(), "causal-lm")
    errors = []
    for ratio in (0.9, 0.6, 0.3, 0.1):
        model = compress(tiny_llama(), SVDConfig(ratio=ratio), progress=False)
        factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        assert factored and all(
            m.rank * (m.in_features + m.out_features) < m.in_features * m.out_features
            for m in factored.values()
        )
        out = model_output(model, "causal-lm")
        errors.append(float((out - reference).norm() / reference.norm()))
    assert errors == sorted(errors) and errors[-1] > 2 * errors[0] > 0
