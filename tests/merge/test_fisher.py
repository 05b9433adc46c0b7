"""Tests for weightkit.merge.fisher: the Fisher-weighted merge, against the formula entry by entry in Python
floats, and the paper's claim on a small case (Fisher merging beats plain averaging)."""

import math

import pytest
import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.merge.fisher import fisher_merge, fisher_norm
from weightkit.merge.fisher_compute import compute_fisher
from weightkit.merge.fisher_file import save_fisher
from weightkit.merge.linear import linear

# -- the merge -------------------------------------------------------------------------------------------


def fisher_merge_reference(tensors, fishers, weights, eps):
    """sum_i w_i max(F_i, eps) t_i / sum_i w_i max(F_i, eps), one entry at a time in Python floats."""
    flat_t = [[float(v) for v in t.reshape(-1)] for t in tensors]
    flat_f = [[float(v) for v in f.reshape(-1)] for f in fishers]
    out = []
    for j in range(len(flat_t[0])):
        num = sum(w * max(f[j], eps) * t[j] for w, f, t in zip(weights, flat_f, flat_t, strict=True))
        den = sum(w * max(f[j], eps) for w, f in zip(weights, flat_f, strict=True))
        out.append(num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(tensors[0].shape)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.3, 0.5], [3.0, 1.0, 0.0]])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_merge_matches_the_formula(weights, eps):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 6, generator=gen) for _ in weights]
    # Fishers spanning several orders of magnitude, some entries exactly 0 (below the floor).
    fishers = [torch.rand(5, 6, generator=gen) ** 4 * 10 for _ in weights]
    for f in fishers:
        f[torch.rand(5, 6, generator=gen) < 0.2] = 0.0
    got = fisher_merge(tensors, fishers, weights, eps=eps)
    assert got.dtype == torch.float32 and got.shape == (5, 6)
    expected = fisher_merge_reference(tensors, fishers, weights, eps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_equal_fishers_give_the_weighted_average():
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 4, generator=gen) for _ in range(3)]
    fisher = torch.rand(4, 4, generator=gen) + 0.1
    weights = [0.6, 0.3, 0.1]
    got = fisher_merge(tensors, [fisher, fisher.clone(), fisher.clone()], weights)
    torch.testing.assert_close(got, linear(tensors, weights), rtol=1e-5, atol=1e-6)


def test_a_model_without_fisher_on_an_entry_contributes_nothing_there():
    a, b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5.0, 5.0, 5.0])
    fisher_a = torch.tensor([0.0, 1.0, 2.0])
    fisher_b = torch.tensor([3.0, 1.0, 0.0])
    got = fisher_merge([a, b], [fisher_a, fisher_b], [0.5, 0.5])
    # Entry 0: only b has Fisher mass, entry 2: only a; entry 1: equal masses, the plain average.
    torch.testing.assert_close(got, torch.tensor([5.0, 3.0, 1.0]), rtol=1e-5, atol=1e-5)
    # Exactly: a keeps the floor's say, 5 - 4 * 1e-6 / (3 + 1e-6), as in the reference code.
    expected = fisher_merge_reference([a, b], [fisher_a, fisher_b], [0.5, 0.5], 1e-6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_entries_without_any_fisher_fall_back_to_the_weighted_average():
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(3, 3, generator=gen) for _ in range(2)]
    zeros = [torch.zeros(3, 3), torch.zeros(3, 3)]
    expected = linear(tensors, [0.25, 0.75])
    torch.testing.assert_close(fisher_merge(tensors, zeros, [0.25, 0.75]), expected, rtol=1e-6, atol=1e-6)
    # eps = 0: no floor, but an entry with no mass at all still gets the weighted average, not 0/0.
    fishers = [torch.zeros(3, 3), torch.zeros(3, 3)]
    fishers[0][0, 0] = 1.0
    got = fisher_merge(tensors, fishers, [0.25, 0.75], eps=0.0)
    assert torch.isfinite(got).all()
    assert float(got[0, 0]) == float(tensors[0][0, 0])
    torch.testing.assert_close(got[1:], expected[1:], rtol=1e-6, atol=1e-6)


def test_merge_keeps_dtype_and_does_not_modify_inputs():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(8, generator=gen).to(torch.bfloat16) for _ in range(2)]
    fishers = [torch.rand(8, generator=gen) for _ in range(2)]
    copies = [t.clone() for t in tensors + fishers]
    got = fisher_merge(tensors, fishers, [1.0, 1.0])
    assert got.dtype == torch.bfloat16
    expected = fisher_merge_reference([t.float() for t in tensors], fishers, [1.0, 1.0], 1e-6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)
    assert all(torch.equal(t, c) for t, c in zip(tensors + fishers, copies, strict=True))


def test_merge_errors_name_the_problem():
    t = [torch.zeros(2, 2), torch.zeros(2, 2)]
    f = [torch.ones(2, 2), torch.ones(2, 2)]
    with pytest.raises(WeightkitError, match="at least one tensor"):
        fisher_merge([], [], [])
    with pytest.raises(WeightkitError, match="2 tensors but 1 Fishers"):
        fisher_merge(t, f[:1], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="2 tensors but 3 weights"):
        fisher_merge(t, f, [1.0, 1.0, 1.0])
    with pytest.raises(WeightkitError, match="Fisher 1 has shape"):
        fisher_merge(t, [f[0], torch.ones(3)], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="tensor 1 has shape"):
        fisher_merge([t[0], torch.zeros(4)], f, [1.0, 1.0])
    with pytest.raises(WeightkitError, match="Fisher 0 has negative"):
        fisher_merge(t, [-f[0], f[1]], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="Fisher 1 contains 1 NaN"):
        fisher_merge(t, [f[0], torch.tensor([[1.0, float("nan")], [1.0, 1.0]])], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="weight 0 is -1.0"):
        fisher_merge(t, f, [-1.0, 2.0])
    with pytest.raises(WeightkitError, match="sum to zero"):
        fisher_merge(t, f, [0.0, 0.0])
    with pytest.raises(WeightkitError, match="eps"):
        fisher_merge(t, f, [1.0, 1.0], eps=-1.0)


def test_fisher_norm_of_dict_and_file_agree(tmp_path):
    fisher = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert fisher_norm(fisher) == 5.0
    path = save_fisher(fisher, tmp_path / "f.safetensors")
    assert fisher_norm(path) == 5.0


# -- the paper's claim, on a small case ------------------------------------------------------------------


def _task(features: slice, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary logistic-regression data that lives on a subset of the 10 features (the rest are 0)."""
    x = torch.zeros(n, 10)
    x[:, features] = torch.randn(n, features.stop - features.start, generator=gen)
    true_w = torch.randn(features.stop - features.start, generator=gen)
    y = (x[:, features] @ true_w > 0).long()
    return x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_fisher_merging_beats_plain_averaging_on_the_union_of_tasks():
    gen = torch.Generator().manual_seed(0)
    xa, ya = _task(slice(0, 5), 256, gen)
    xb, yb = _task(slice(5, 10), 256, gen)
    torch.manual_seed(0)
    init = nn.Linear(10, 2)
    model_a = nn.Linear(10, 2)
    model_a.load_state_dict(init.state_dict())  # both fine-tunes start from one initialisation
    model_a = _train(model_a, xa, ya)
    model_b = nn.Linear(10, 2)
    model_b.load_state_dict(init.state_dict())
    model_b = _train(model_b, xb, yb)

    fisher_a = compute_fisher(model_a, [xa], mode="exact", progress=False)
    fisher_b = compute_fisher(model_b, [xb], mode="exact", progress=False)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    fisher_state = {
        n: fisher_merge([state_a[n], state_b[n]], [fisher_a[n], fisher_b[n]], [0.5, 0.5]) for n in state_a
    }
    average_state = {n: linear([state_a[n], state_b[n]], [0.5, 0.5]) for n in state_a}

    x, y = torch.cat([xa, xb]), torch.cat([ya, yb])

    def union_loss(state):
        merged = nn.Linear(10, 2)
        merged.load_state_dict(state)
        with torch.no_grad():
            return float(nn.functional.cross_entropy(merged(x), y))

    loss_a, loss_b = union_loss(state_a), union_loss(state_b)
    fisher_loss, average_loss = union_loss(fisher_state), union_loss(average_state)
    assert fisher_loss < 0.8 * average_loss, (fisher_loss, average_loss)
    assert fisher_loss < min(loss_a, loss_b)
    assert math.isfinite(fisher_loss)
