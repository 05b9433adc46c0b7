"""Tests for weightkit.merge.task_arithmetic: sign election and the task-arithmetic core.

Each function is compared with its rule written out entry by entry in Python (loops for sums).
"""

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.sparsify import magnitude_prune
from weightkit.merge.task_arithmetic import elect_signs, sign_conflict_rate, task_arithmetic


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- references


def task_arithmetic_reference(base, deltas, weights, sign_consensus, normalize, scale):
    """Entry by entry: weighted deltas, sign election (sum >= 0 elects +), kept sum, kept-weight divisor."""
    flat_deltas = [[float(v) for v in d.reshape(-1)] for d in deltas]
    out = []
    for j, b in enumerate(float(v) for v in base.reshape(-1)):
        weighted = [w * d[j] for w, d in zip(weights, flat_deltas, strict=True)]
        if sign_consensus:
            elected = 1.0 if sum(weighted) >= 0 else -1.0
            kept = [i for i, x in enumerate(weighted) if x != 0 and (x > 0) == (elected > 0)]
            mixed = sum(weighted[i] for i in kept)
            divisor = sum(weights[i] for i in kept)
            divisor = divisor if divisor != 0 else 1.0
        else:
            mixed = sum(weighted)
            divisor = sum(weights)
        out.append(b + scale * (mixed / divisor if normalize else mixed))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


# ---------------------------------------------------------------------------------------------- sign election


def test_elect_signs_matches_loop():
    stacked = torch.tensor(
        [
            [1.0, -2.0, 0.0, 3.0, -1.0, 0.0],
            [-1.0, 1.0, 2.0, -1.0, 1.0, 0.0],
            [0.0, -0.5, -1.0, -1.0, 0.0, 0.0],
        ]
    )
    got = elect_signs(stacked)
    expected = torch.zeros_like(stacked, dtype=torch.bool)
    for j in range(stacked.shape[1]):
        column = [float(v) for v in stacked[:, j]]
        elected = 1.0 if sum(column) >= 0 else -1.0
        for i, v in enumerate(column):
            expected[i, j] = v != 0 and (v > 0) == (elected > 0)
    assert torch.equal(got, expected)
    # Column 0 sums to 0: + is elected, so only the positive entry agrees; zeros never agree.
    assert got[:, 0].tolist() == [True, False, False]
    assert got[:, 5].tolist() == [False, False, False]


def test_sign_conflict_rate_matches_loop():
    deltas = [randn(7, 5, seed=s) for s in range(3)]
    deltas[0][0, :] = 0.0
    deltas[1][0, :3] = 0.0
    deltas[2][0, :] = deltas[0][0, :].abs() + 1  # row 0: at most one non-zero sign per column
    expected = 0
    columns = list(zip(*[d.reshape(-1).tolist() for d in deltas], strict=True))
    for values in columns:
        expected += any(v > 0 for v in values) and any(v < 0 for v in values)
    assert sign_conflict_rate(deltas) == pytest.approx(expected / len(columns))
    assert sign_conflict_rate([deltas[0], deltas[0]]) == 0.0
    assert sign_conflict_rate([deltas[1], -deltas[1]]) == pytest.approx(
        float((deltas[1] != 0).double().mean())
    )


# ---------------------------------------------------------------------------------------------- the core


@pytest.mark.parametrize("sign_consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("weights", "scale"), [([1.0, 1.0, 1.0], 1.0), ([0.7, -0.4, 1.3], 0.5)])
def test_task_arithmetic_matches_reference(sign_consensus, normalize, weights, scale):
    base = randn(6, 5, seed=20)
    deltas = [randn(6, 5, seed=21 + i) for i in range(3)]
    deltas[1][0] = 0.0
    copies = [d.clone() for d in deltas], base.clone()
    got = task_arithmetic(
        base, deltas, weights, sign_consensus=sign_consensus, normalize=normalize, scale=scale
    )
    expected = task_arithmetic_reference(base, deltas, weights, sign_consensus, normalize, scale)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(d, c) for d, c in zip(deltas, copies[0], strict=True))
    assert torch.equal(base, copies[1])


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_trim_elect_disjoint_mean(density):
    base = randn(8, 6, seed=30)
    deltas = [randn(8, 6, seed=31 + i) for i in range(3)]
    weights = [1.0, 0.6, 0.8]
    got = task_arithmetic(
        base,
        [magnitude_prune(d, density) for d in deltas],
        weights,
        sign_consensus=True,
        normalize=True,
    )
    # Trimmed as TIES does (magnitude_prune is checked against its rule in test_sparsify.py), then the
    # election and disjoint mean by loops.
    expected = task_arithmetic_reference(
        base, [magnitude_prune(d, density) for d in deltas], weights, True, True, 1.0
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_ties_differs_from_the_average_where_signs_conflict():
    base = torch.zeros(3)
    deltas = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -0.5, 3.0])]
    ties = task_arithmetic(base, deltas, [1.0, 1.0], sign_consensus=True, normalize=True)
    average = task_arithmetic(base, deltas, [1.0, 1.0], normalize=True)
    # Entry 1: + is elected (2 - 0.5 > 0), so only the first model counts, divided by its weight alone.
    assert ties.tolist() == [1.0, 2.0, 3.0]
    assert average.tolist() == [1.0, 0.75, 3.0]


def test_ties_elects_plus_on_a_tie_and_ignores_zero_entries():
    base = torch.zeros(2)
    deltas = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 4.0])]
    got = task_arithmetic(base, deltas, [1.0, 1.0, 1.0], sign_consensus=True, normalize=True)
    # Entry 0 sums to exactly 0: + wins, and the zero delta of model 2 is not in the divisor (1, not 2).
    # Entry 1: only model 2 has a sign, so the disjoint mean is 4 / 1.
    assert got.tolist() == [1.0, 4.0]


def test_merging_a_model_with_itself_returns_it():
    base = randn(5, 4, seed=40)
    finetuned = base + 0.1 * randn(5, 4, seed=41)
    delta = finetuned - base
    ties = task_arithmetic(base, [delta, delta], [0.5, 0.5], sign_consensus=True, normalize=True)
    torch.testing.assert_close(ties, finetuned, rtol=1e-6, atol=1e-6)
    mean = task_arithmetic(base, [delta, delta, delta], [1.0, 2.0, 3.0], normalize=True)
    torch.testing.assert_close(mean, finetuned, rtol=1e-6, atol=1e-6)


# (False, True) is a weighted average over a zero total weight: refused (test_task_arithmetic_scale...).
@pytest.mark.parametrize(("sign_consensus", "normalize"), [(False, False), (True, True)])
def test_weight_zero_returns_the_base(sign_consensus, normalize):
    base = randn(4, 3, seed=50)
    out = task_arithmetic(
        base, [randn(4, 3, seed=51)], [0.0], sign_consensus=sign_consensus, normalize=normalize
    )
    assert torch.equal(out, base)
    assert out.data_ptr() != base.data_ptr()


def test_task_arithmetic_scale_and_validation():
    base = torch.ones(3)
    delta = torch.tensor([1.0, -2.0, 0.5])
    assert task_arithmetic(base, [delta], [2.0], scale=0.5).tolist() == [2.0, -1.0, 1.5]
    empty = task_arithmetic(base, [], [])
    assert torch.equal(empty, base) and empty.data_ptr() != base.data_ptr()
    with pytest.raises(WeightkitError, match="1 task vectors but 2 weights"):
        task_arithmetic(base, [delta], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="shape"):
        task_arithmetic(base, [torch.ones(4)], [1.0])
    with pytest.raises(WeightkitError, match="sum to zero"):
        task_arithmetic(base, [delta, delta], [0.5, -0.5], normalize=True)
    # With sign consensus the divisor is per entry (the agreeing weights), so this is defined.
    task_arithmetic(base, [delta, delta], [0.5, -0.5], normalize=True, sign_consensus=True)


@pytest.mark.parametrize("sign_consensus", [False, True])
def test_task_arithmetic_can_write_into_the_base_over_several_chunks(monkeypatch, sign_consensus):
    # Chunks of 7 entries over 30: the base is read chunk by chunk as the result overwrites it.
    monkeypatch.setattr("weightkit.merge.task_arithmetic._CHUNK", 7)
    base = randn(6, 5, seed=60)
    deltas = [randn(6, 5, seed=61 + i) for i in range(3)]
    weights = [0.7, -0.4, 1.3]
    expected = task_arithmetic_reference(base, deltas, weights, sign_consensus, True, 0.5)
    target = base.clone()
    out = task_arithmetic(
        target, deltas, weights, sign_consensus=sign_consensus, normalize=True, scale=0.5, out=target
    )
    assert out.data_ptr() == target.data_ptr()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightkitError, match="out must be a contiguous torch.float32 tensor"):
        task_arithmetic(base, deltas, weights, out=torch.empty(5, 6).T)
