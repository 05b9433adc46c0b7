"""Tests for weightkit.merge.rebasin (Git Re-Basin weight matching, arXiv 2209.04836).

The pure functions are checked against plain references written here (permutation by explicit loops,
the optimum of one permutation by brute force over all of them), and the method by what it is for (lower
loss barrier between two MLPs trained from different seeds).
"""

import contextlib
import itertools
import math

import pytest
import torch
from permutations import assert_states_equal, random_perms, take_rows
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.merge.rebasin import (
    PermutationSpec,
    apply_permutation,
    matching_objective,
    mlp_spec,
    weight_matching,
)

# -- helpers -------------------------------------------------------------------------------------------


def make_mlp(seed, sizes=(10, 20, 16, 3)):
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def loaded_copy_mlp(state, sizes=(10, 20, 16, 3)):
    model = make_mlp(0, sizes)
    model.load_state_dict(state)
    return model


def clone_state(state):
    return {name: t.clone() for name, t in state.items()}


# -- the spec ------------------------------------------------------------------------------------------


def test_spec_refuses_unknown_unused_and_bad_sizes():
    with pytest.raises(WeightkitError, match="names permutation 'q'"):
        PermutationSpec({"p": 3}, {"w": ("q", None)})
    with pytest.raises(WeightkitError, match="permutation unused acts on no tensor"):
        PermutationSpec({"p": 3, "unused": 2}, {"w": ("p", None)})
    with pytest.raises(WeightkitError, match="positive integer"):
        PermutationSpec({"p": 0}, {"w": ("p",)})
    spec = PermutationSpec({"p": 3}, {"a": ["p", None], "b": (None, "p")})
    assert spec.axes["a"] == ("p", None)
    assert spec.perm_axes() == {"p": [("a", 0), ("b", 1)]}


def test_mlp_spec_of_a_sequential():
    spec = mlp_spec(make_mlp(0).state_dict())
    assert spec.sizes == {"0": 20, "2": 16}
    assert spec.axes == {
        "0.weight": ("0", None),
        "0.bias": ("0",),
        "2.weight": ("2", "0"),
        "2.bias": ("2",),
        "4.weight": (None, "2"),
    }


def test_mlp_spec_refuses_what_is_not_a_chain_of_linear_layers():
    with pytest.raises(WeightkitError, match="norm.weight"):
        mlp_spec({**make_mlp(0).state_dict(), "norm.weight": torch.ones(3)})
    broken = make_mlp(0).state_dict()
    broken["2.weight"] = torch.zeros(16, 21)
    with pytest.raises(WeightkitError, match="not a chain"):
        mlp_spec(broken)
    with pytest.raises(WeightkitError, match="at least two"):
        mlp_spec(nn.Linear(3, 4).state_dict())


# -- apply_permutation ---------------------------------------------------------------------------------


def test_apply_permutation_equals_indexing_by_hand_and_leaves_the_input_alone():
    state = make_mlp(0).state_dict()
    original = clone_state(state)
    spec = mlp_spec(state)
    perms = random_perms(spec, seed=1)
    out = apply_permutation(state, spec, perms)
    p0, p2 = perms["0"].tolist(), perms["2"].tolist()
    expected = {
        "0.weight": torch.stack([state["0.weight"][i] for i in p0]),
        "0.bias": torch.stack([state["0.bias"][i] for i in p0]),
        "2.weight": torch.stack([torch.stack([state["2.weight"][i, j] for j in p0]) for i in p2]),
        "2.bias": torch.stack([state["2.bias"][i] for i in p2]),
        "4.weight": torch.stack([state["4.weight"][:, j] for j in p2], dim=1),
        "4.bias": state["4.bias"],
    }
    assert_states_equal(out, expected)
    assert_states_equal(state, original)


def test_apply_permutation_moves_blocks_when_an_axis_is_longer_than_the_permutation():
    gen = torch.Generator().manual_seed(0)
    state = {"q": torch.randn(6, 5, generator=gen), "o": torch.randn(5, 6, generator=gen)}
    spec = PermutationSpec({"heads": 3}, {"q": ("heads", None), "o": (None, "heads")})
    index = torch.tensor([2, 0, 1])
    out = apply_permutation(state, spec, {"heads": index})
    torch.testing.assert_close(out["q"], take_rows(state["q"], index, 2), rtol=0, atol=0)
    torch.testing.assert_close(out["o"], take_rows(state["o"].T, index, 2).T, rtol=0, atol=0)


def test_sections_of_one_axis_are_each_permuted_alike_and_matching_recovers_them():
    # A fused layer of 3 units: 6 "query" rows (blocks of 2), then 3 "key" and 3 "value" rows (blocks of 1).
    gen = torch.Generator().manual_seed(0)
    state = {"qkv": torch.randn(12, 5, generator=gen), "o": torch.randn(5, 6, generator=gen)}
    spec = PermutationSpec(
        {"heads": 3}, {"qkv": ("heads", None), "o": (None, "heads")}, sections={"qkv": (6, 3, 3)}
    )
    index = torch.tensor([2, 0, 1])
    out = apply_permutation(state, spec, {"heads": index})
    q, k, v = state["qkv"].split([6, 3, 3])
    expected = torch.cat([take_rows(q, index, 2), take_rows(k, index, 1), take_rows(v, index, 1)])
    torch.testing.assert_close(out["qkv"], expected, rtol=0, atol=0)
    found = weight_matching(state, out, spec)
    assert_states_equal(apply_permutation(out, spec, found), state)
    with pytest.raises(WeightkitError, match=r"not the sum of its sections \[6, 3, 2\]"):
        apply_permutation(
            state, PermutationSpec({"p": 3}, {"qkv": ("p", None)}, {"qkv": (6, 3, 2)}), {"p": index}
        )
    with pytest.raises(WeightkitError, match="not a multiple of the 3 units"):
        apply_permutation(
            state, PermutationSpec({"p": 3}, {"qkv": ("p", None)}, {"qkv": (6, 4, 2)}), {"p": index}
        )
    with pytest.raises(WeightkitError, match="not permuted along exactly one axis"):
        PermutationSpec({"p": 3}, {"qkv": ("p", "p")}, sections={"qkv": (6, 3, 3)})


def test_apply_permutation_refuses_bad_input():
    state = make_mlp(0).state_dict()
    spec = mlp_spec(state)
    perms = random_perms(spec, seed=0)
    with pytest.raises(WeightkitError, match="no index tensor for permutation 2"):
        apply_permutation(state, spec, {"0": perms["0"]})
    with pytest.raises(WeightkitError, match="not a permutation"):
        apply_permutation(state, spec, {**perms, "0": torch.zeros(20, dtype=torch.long)})
    with pytest.raises(WeightkitError, match="tensor 2.bias of the permutation spec is missing"):
        apply_permutation({k: v for k, v in state.items() if k != "2.bias"}, spec, perms)
    odd = PermutationSpec({"p": 3}, {"0.weight": ("p", None)})
    with pytest.raises(WeightkitError, match="not a multiple of the 3 units"):
        apply_permutation(state, odd, {"p": torch.arange(3)})


def test_permuting_hidden_units_keeps_the_mlp_function():
    model = make_mlp(0)
    spec = mlp_spec(model.state_dict())
    permuted = loaded_copy_mlp(apply_permutation(model.state_dict(), spec, random_perms(spec, seed=3)))
    x = torch.randn(7, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(permuted[0].weight, model[0].weight)


# -- weight_matching -----------------------------------------------------------------------------------


def test_weight_matching_recovers_a_known_permutation_of_an_mlp_exactly():
    reference = make_mlp(0, sizes=(10, 32, 24, 16, 3)).state_dict()
    spec = mlp_spec(reference)
    shuffled = apply_permutation(reference, spec, random_perms(spec, seed=5))
    original = clone_state(shuffled)
    perms = weight_matching(reference, shuffled, spec, seed=0)
    assert_states_equal(apply_permutation(shuffled, spec, perms), reference)
    assert_states_equal(shuffled, original)  # inputs not modified
    assert all(p.dtype == torch.int64 for p in perms.values())


def plain_objective(reference, other, spec, perms):
    """<reference, permuted other> summed over the spec tensors, with the permutation done by loops."""
    total = 0.0
    for name, axes in spec.axes.items():
        tensor = other[name]
        for axis, perm in enumerate(axes):
            if perm is not None:
                block = tensor.shape[axis] // spec.sizes[perm]
                tensor = take_rows(tensor.movedim(axis, 0), perms[perm], block).movedim(0, axis)
        total += float((reference[name].double() * tensor.double()).sum())
    return total


def test_one_permutation_is_solved_to_the_brute_force_optimum():
    # One hidden layer: the problem is a single assignment, which weight matching must solve exactly.
    reference = make_mlp(0, sizes=(4, 6, 3)).state_dict()
    other = make_mlp(1, sizes=(4, 6, 3)).state_dict()
    spec = mlp_spec(reference)
    scores = {
        order: plain_objective(reference, other, spec, {"0": torch.tensor(order)})
        for order in itertools.permutations(range(6))
    }
    best = max(scores, key=scores.get)
    perms = weight_matching(reference, other, spec)
    assert tuple(perms["0"].tolist()) == best
    assert math.isclose(matching_objective(reference, other, spec, perms), scores[best], rel_tol=1e-6)


def test_heads_are_assigned_whole_by_the_summed_similarity_of_their_slices():
    # Four heads of width 3 in q (rows), k (rows) and o (columns): brute force over the 24 head orders,
    # scoring each head pair as the sum over q, k, o of the inner products of their slices.
    gen = torch.Generator().manual_seed(0)
    heads, width = 4, 3

    def head_state():
        return {
            "q": torch.randn(heads * width, 5, generator=gen),
            "k": torch.randn(heads * width, 5, generator=gen),
            "o": torch.randn(5, heads * width, generator=gen),
        }

    reference, other = head_state(), head_state()
    spec = PermutationSpec({"h": heads}, {"q": ("h", None), "k": ("h", None), "o": (None, "h")})

    def pair_score(i, j):
        rows_i, rows_j = slice(i * width, (i + 1) * width), slice(j * width, (j + 1) * width)
        return sum(float((reference[t][rows_i] * other[t][rows_j]).sum()) for t in ("q", "k")) + float(
            (reference["o"][:, rows_i] * other["o"][:, rows_j]).sum()
        )

    scores = {
        order: sum(pair_score(i, j) for i, j in enumerate(order))
        for order in itertools.permutations(range(heads))
    }
    best = max(scores, key=scores.get)
    perms = weight_matching(reference, other, spec)
    assert tuple(perms["h"].tolist()) == best
    assert math.isclose(matching_objective(reference, other, spec, perms), scores[best], rel_tol=1e-5)


def test_weight_matching_is_deterministic_and_never_lowers_the_objective():
    reference = make_mlp(0, sizes=(8, 24, 24, 24, 4)).state_dict()
    other = make_mlp(1, sizes=(8, 24, 24, 24, 4)).state_dict()
    spec = mlp_spec(reference)
    first = weight_matching(reference, other, spec, seed=3)
    again = weight_matching(reference, other, spec, seed=3)
    assert all(torch.equal(first[p], again[p]) for p in spec.sizes)
    before = matching_objective(reference, other, spec)
    for seed in (0, 3):
        perms = weight_matching(reference, other, spec, seed=seed)
        assert matching_objective(reference, other, spec, perms) > before
    one_round = weight_matching(reference, other, spec, seed=3, max_iter=1)
    assert matching_objective(reference, other, spec, first) >= matching_objective(
        reference, other, spec, one_round
    )
    with pytest.raises(WeightkitError, match="max_iter"):
        weight_matching(reference, other, spec, max_iter=0)
    with pytest.raises(WeightkitError, match="has shape"):
        weight_matching(reference, make_mlp(1, sizes=(9, 24, 24, 24, 4)).state_dict(), spec)


def test_weight_matching_refuses_nan_weights():
    reference = make_mlp(0).state_dict()
    other = clone_state(reference)
    other["2.weight"][3, 4] = float("nan")
    with pytest.raises(WeightkitError, match="NaN/Inf"):
        weight_matching(reference, other, mlp_spec(reference))


@contextlib.contextmanager
def one_cpu_thread():
    # Hundreds of tiny optimizer steps: with two threads on a busy machine each step waits for the other
    # thread (26 s instead of 5 s in one measurement).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_alignment_lowers_the_loss_barrier_between_mlps_trained_from_different_seeds():
    # Two concentric rings: an easy task that two 64-wide MLPs solve equally well from different starts.
    gen = torch.Generator().manual_seed(0)
    n = 256
    labels = torch.randint(0, 2, (n,), generator=gen)
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    radius = 0.5 + 0.5 * labels + 0.15 * torch.randn(n, generator=gen)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    sizes = (2, 64, 64, 2)

    def trained(seed):
        model = make_mlp(seed, sizes)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), labels).backward()
            optimizer.step()
        return {k: v.detach() for k, v in model.state_dict().items()}

    def loss(state):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(loaded_copy_mlp(state, sizes)(x), labels))

    def barrier(a, b):
        # Highest rise of the loss above the straight line between the endpoints' losses.
        ends = loss(a), loss(b)
        return max(
            loss({k: (1 - t) * a[k] + t * b[k] for k in a}) - ((1 - t) * ends[0] + t * ends[1])
            for t in (0.25, 0.5, 0.75)
        )

    with one_cpu_thread():
        a, b = trained(1), trained(2)
        spec = mlp_spec(a)
        aligned = apply_permutation(b, spec, weight_matching(a, b, spec))
        assert loss(a) < 0.2 and loss(b) < 0.2  # both learned the task
        assert math.isclose(loss(aligned), loss(b), rel_tol=1e-5)  # same function
        naive, after = barrier(a, b), barrier(a, aligned)
    assert naive > 0.3  # there is a barrier to remove
    assert after < 0.25 * naive
