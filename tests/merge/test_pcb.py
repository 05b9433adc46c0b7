"""Tests for weightkit.merge.pcb: PCB-merging (Du et al., arXiv 2410.02396) per tensor and over a whole model.

The reference below is the paper's equations written out in float64 on flat vectors: softmaxes over all
entries, ``sorted(beta_i)[int((1 - r) * D)]`` as the drop threshold, and the rescale as a loop over entries.
The whole-model scope is compared with that reference applied to the concatenation of every tensor.
"""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.pcb import PCBStats, pcb_merge, pcb_model_stats


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------- reference


def norm_reference(x):
    """Min-max scaling to [0, 1] over all entries (0 everywhere when they are all equal)."""
    low, high = x.min(), x.max()
    if high == low:
        return torch.zeros_like(x)
    return (x - low) / (high - low)


def pcb_reference(base, deltas, ratio, scale):
    """The paper's equations on the flattened task vectors, float64."""
    taus = [d.reshape(-1).to(torch.float64) for d in deltas]
    n, d = len(taus), taus[0].numel()
    kept = []
    for i in range(n):
        beta_intra = torch.softmax(n * norm_reference(taus[i] * taus[i]), dim=0)
        beta_inter = sum(torch.softmax(norm_reference(taus[i] * taus[j]), dim=0) for j in range(n))
        beta = beta_intra * beta_inter
        threshold = sorted(beta.tolist())[int((1 - ratio) * d)]
        kept.append([b if b >= threshold else 0.0 for b in beta.tolist()])
    merged = []
    for e in range(d):
        divisor = sum(kept[i][e] for i in range(n))
        numerator = sum(kept[i][e] * float(taus[i][e]) for i in range(n))
        merged.append(numerator / divisor if divisor > 0 else 0.0)
    tau_m = torch.tensor(merged, dtype=torch.float64).reshape(base.shape)
    return (base.to(torch.float64) + scale * tau_m).to(base.dtype)


def task_vectors(n, shape, seed, zeros=0.0):
    """n task vectors of different overall magnitudes; a fraction of task 0's entries set to exactly 0."""
    deltas = [randn(*shape, seed=seed + i) * (0.5 + i) for i in range(n)]
    if zeros:
        flat = deltas[0].reshape(-1)
        flat[: int(zeros * flat.numel())] = 0.0
    return deltas


def stream(models, names):
    """The delta_stream of pcb_model_stats over a {name: tensor} dict per model."""
    return lambda: ([m[name] for m in models] for name in names)


# ------------------------------------------------------------------------------------------ per tensor


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("ratio", [0.1, 0.35, 0.8, 1.0])
@pytest.mark.parametrize("shape", [(40,), (6, 9)])
def test_per_tensor_matches_the_papers_equations(n, ratio, shape):
    base = randn(*shape, seed=100)
    deltas = task_vectors(n, shape, seed=10 * n, zeros=0.2)
    expected = pcb_reference(base, deltas, ratio, scale=0.8)
    torch.testing.assert_close(
        pcb_merge(base, deltas, ratio=ratio, scale=0.8), expected, rtol=1e-5, atol=1e-6
    )


def test_inputs_are_not_modified_and_float32_works():
    base = randn(5, 8, seed=1, dtype=torch.float32)
    deltas = task_vectors(3, (5, 8), seed=2)
    deltas = [d.float() for d in deltas]
    copies = [base.clone()] + [d.clone() for d in deltas]
    out = pcb_merge(base, deltas, ratio=0.4, scale=1.1)
    assert out.dtype == torch.float32 and out.shape == base.shape
    for before, after in zip(copies, [base] + deltas, strict=True):
        assert torch.equal(before, after)
    torch.testing.assert_close(out, pcb_reference(base, deltas, 0.4, 1.1), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_are_computed_in_float32_and_returned_in_bfloat16():
    base = randn(4, 16, seed=3).to(torch.bfloat16)
    deltas = [d.to(torch.bfloat16) for d in task_vectors(2, (4, 16), seed=4)]
    out = pcb_merge(base, deltas, ratio=0.5)
    assert out.dtype == torch.bfloat16
    expected = pcb_reference(base.double(), [d.double() for d in deltas], 0.5, 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_a_task_that_left_the_tensor_untouched_gives_no_nan():
    # Its products are all 0, so Norm would divide 0 by 0: it is 0 instead (uniform softmax).
    base = randn(30, seed=5)
    deltas = [randn(30, seed=6), torch.zeros(30, dtype=torch.float64)]
    out = pcb_merge(base, deltas, ratio=0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, pcb_reference(base, deltas, 0.5, 1.0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- properties


def test_ratio_one_keeps_every_entry():
    base = randn(50, seed=7)
    deltas = task_vectors(3, (50,), seed=8)
    out = pcb_merge(base, deltas, ratio=1.0, scale=0.5)
    # Nothing dropped: the score-weighted mean of all task vectors, written with explicit softmaxes.
    taus = [d.reshape(-1) for d in deltas]
    betas = [
        torch.softmax(3 * norm_reference(t * t), 0)
        * sum(torch.softmax(norm_reference(t * u), 0) for u in taus)
        for t in taus
    ]
    expected = base + 0.5 * sum(b * t for b, t in zip(betas, taus, strict=True)) / sum(betas)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_ratio_one_needs_only_two_stats_passes():
    models = [{"w": d} for d in task_vectors(2, (20,), seed=9)]
    calls = []

    def deltas():
        calls.append(1)
        return stream(models, ["w"])()

    stats = pcb_model_stats(deltas, n_models=2, ratio=1.0)
    assert len(calls) == 2 and stats.ready and stats.thresholds is None
    calls.clear()
    pcb_model_stats(deltas, n_models=2, ratio=0.5)
    assert len(calls) == 4


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_identical_task_vectors_give_the_task_vector_trimmed_by_magnitude(ratio):
    # All beta_i are equal, so the rescale returns tau itself where it is kept; and beta is increasing in
    # tau**2, so the top-r scores are the top-r magnitudes.
    base = randn(60, seed=10)
    tau = randn(60, seed=11)
    out = pcb_merge(base, [tau, tau.clone(), tau.clone()], ratio=ratio, scale=1.5)
    cut = sorted(tau.abs().tolist())[int((1 - ratio) * 60)]
    kept = torch.where(tau.abs() >= cut, tau, 0.0)
    torch.testing.assert_close(out, base + 1.5 * kept, rtol=1e-6, atol=1e-7)
    assert int((kept != 0).sum()) == 60 - int((1 - ratio) * 60)


def test_scaling_every_task_vector_scales_the_merged_task_vector():
    # Norm is min-max, so every score is unchanged when all task vectors are multiplied by c > 0.
    base = randn(3, 20, seed=12)
    deltas = task_vectors(3, (3, 20), seed=13)
    merged = pcb_merge(base, deltas, ratio=0.4) - base
    scaled = pcb_merge(base, [4.0 * d for d in deltas], ratio=0.4) - base
    torch.testing.assert_close(scaled, 4.0 * merged, rtol=1e-6, atol=1e-8)


def test_pcb_differs_from_the_average_where_task_vectors_conflict():
    # Two task vectors with the same multiset of magnitudes (so the per-task softmax denominators are
    # equal) and opposite signs on about half of the entries. At a conflicting entry both get the same
    # inter-balancing cross term, and intra-balancing plus the self term favour the larger magnitude, so
    # the merge leans towards the dominant task where the plain average cancels half of it.
    base = torch.zeros(100, dtype=torch.float64)
    generator = torch.Generator().manual_seed(14)
    magnitude = torch.rand(100, generator=generator, dtype=torch.float64) + 0.1
    t0 = magnitude
    t1 = (
        magnitude[torch.randperm(100, generator=generator)]
        * torch.where(torch.rand(100, generator=generator) < 0.5, -1.0, 1.0).double()
    )
    conflict = (t0 * t1 < 0) & (t0.abs() != t1.abs())
    assert int(conflict.sum()) > 30
    out = pcb_merge(base, [t0, t1], ratio=1.0)
    average = (t0 + t1) / 2
    dominant = torch.where(t0.abs() > t1.abs(), t0, t1)
    assert not torch.allclose(out[conflict], average[conflict])
    pcb_error = (out - dominant).abs()[conflict]
    average_error = (average - dominant).abs()[conflict]
    assert bool((pcb_error < average_error).all())
    # Where the two agree in sign, the merge stays between them, as the average does.
    agree = t0 * t1 > 0
    low, high = torch.minimum(t0, t1)[agree], torch.maximum(t0, t1)[agree]
    assert bool(((out[agree] >= low - 1e-12) & (out[agree] <= high + 1e-12)).all())


def test_the_drop_keeps_the_top_ratio_of_each_tasks_scores():
    # Task 1 only: a single task vector scores by magnitude, so ratio 0.25 keeps its largest quarter.
    base = torch.zeros(40, dtype=torch.float64)
    tau = randn(40, seed=16)
    out = pcb_merge(base, [tau], ratio=0.25)
    order = sorted(range(40), key=lambda e: -abs(float(tau[e])))
    assert {e for e in range(40) if out[e] != 0} == set(order[:10])


# ------------------------------------------------------------------------------------------ whole model


SHAPES = {"embed": (7, 5), "norm": (31,), "mlp": (3, 4, 5)}


def whole_model(n, seed):
    models = [{} for _ in range(n)]
    for k, (name, shape) in enumerate(SHAPES.items()):
        for i, delta in enumerate(task_vectors(n, shape, seed=seed + 10 * k, zeros=0.3 if k == 2 else 0.0)):
            # Tensors of very different magnitudes: whole-model Norm is dominated by "norm".
            models[i][name] = delta * (10.0 if name == "norm" else 1.0)
    bases = {name: randn(*shape, seed=seed + 100 + k) for k, (name, shape) in enumerate(SHAPES.items())}
    return bases, models


@pytest.mark.parametrize("n, ratio", [(3, 0.25), (2, 0.6), (4, 1.0)])
def test_whole_model_equals_the_reference_on_the_concatenated_model(n, ratio):
    bases, models = whole_model(n, seed=20 + n)
    names = list(SHAPES)
    stats = pcb_model_stats(stream(models, names), n_models=n, ratio=ratio)
    assert stats.numel == sum(math.prod(s) for s in SHAPES.values())
    merged = {
        name: pcb_merge(bases[name], [m[name] for m in models], ratio=ratio, scale=1.3, stats=stats)
        for name in names
    }

    flat_base = torch.cat([bases[name].reshape(-1) for name in names])
    flat_deltas = [torch.cat([m[name].reshape(-1) for name in names]) for m in models]
    expected = pcb_reference(flat_base, flat_deltas, ratio, scale=1.3)
    start = 0
    for name in names:
        size = bases[name].numel()
        piece = expected[start : start + size].reshape(bases[name].shape)
        torch.testing.assert_close(merged[name], piece, rtol=1e-5, atol=1e-5)
        start += size

    # The scope matters: per tensor, "norm" no longer decides the normalisation of the others.
    per_tensor = pcb_merge(bases["mlp"], [m["mlp"] for m in models], ratio=ratio, scale=1.3)
    assert not torch.allclose(per_tensor, merged["mlp"])


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.77, 0.999])
def test_whole_model_stats_of_one_tensor_equal_the_per_tensor_merge(ratio):
    # The radix selection over float32 bit patterns must pick exactly the score kthvalue picks, ties
    # (task 0's zero entries all share one score) included.
    base = randn(300, seed=30)
    deltas = task_vectors(3, (300,), seed=31, zeros=0.6)
    stats = pcb_model_stats(lambda: iter([deltas]), n_models=3, ratio=ratio)
    assert torch.equal(
        pcb_merge(base, deltas, ratio=ratio, stats=stats), pcb_merge(base, deltas, ratio=ratio)
    )


def test_stats_do_not_depend_on_how_a_tensor_is_split():
    # Thresholds, min/max and sums over the scope are the same whether one tensor or its pieces are fed.
    deltas = task_vectors(2, (4, 50), seed=40)
    whole = pcb_model_stats(lambda: iter([deltas]), n_models=2, ratio=0.3)
    rows = lambda: ([d[r] for d in deltas] for r in range(4))  # noqa: E731
    split = pcb_model_stats(rows, n_models=2, ratio=0.3)
    assert torch.equal(whole.prod_min, split.prod_min) and torch.equal(whole.prod_max, split.prod_max)
    torch.testing.assert_close(whole.inter_mean, split.inter_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(whole.thresholds, split.thresholds, rtol=1e-6, atol=0)


def test_stats_can_be_fed_by_hand():
    deltas = task_vectors(2, (10,), seed=41)
    stats = PCBStats(2, 0.5)
    stages = []
    while not stats.ready:
        stages.append(stats.stage)
        stats.update(deltas)
        stats.update([d[:0] for d in deltas])  # empty tensors are ignored
        stats.finish_pass()
    assert stages == ["range", "softmax", "coarse", "fine"]
    assert stats.thresholds.dtype == torch.float32 and stats.thresholds.shape == (2,)


# ------------------------------------------------------------------------------------------- edge cases


def test_no_task_vectors_or_no_entries_give_a_copy_of_the_base():
    base = randn(6, seed=50)
    out = pcb_merge(base, [], ratio=0.5)
    assert torch.equal(out, base) and out is not base
    empty = torch.zeros(0, 3)
    assert pcb_merge(empty, [empty.clone(), empty.clone()], ratio=0.5).shape == (0, 3)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_ratio_is_refused(ratio):
    base = randn(4, seed=51)
    with pytest.raises(WeightkitError, match="ratio"):
        pcb_merge(base, [base.clone()], ratio=ratio)
    with pytest.raises(WeightkitError, match="ratio"):
        PCBStats(1, ratio)


def test_shape_mismatch_is_refused():
    base = randn(4, 3, seed=52)
    with pytest.raises(WeightkitError, match=r"task vector 1 has shape \(3, 4\)"):
        pcb_merge(base, [randn(4, 3), randn(3, 4)], ratio=0.5)
    stats = PCBStats(2, 0.5)
    with pytest.raises(WeightkitError, match=r"task vector 1 has shape \(5,\)"):
        stats.update([randn(4), randn(5)])
    with pytest.raises(WeightkitError, match="expected 2 task vectors, got 3"):
        stats.update([randn(4)] * 3)


@pytest.mark.parametrize("n_models", [0, 65, 2.0, True])
def test_bad_model_count_is_refused(n_models):
    with pytest.raises(WeightkitError, match="n_models"):
        PCBStats(n_models, 0.5)


def test_stats_that_do_not_fit_are_refused():
    base = randn(8, seed=53)
    deltas = task_vectors(2, (8,), seed=54)
    with pytest.raises(WeightkitError, match="not ready"):
        pcb_merge(base, deltas, ratio=0.5, stats=PCBStats(2, 0.5))
    stats = pcb_model_stats(lambda: iter([deltas]), n_models=2, ratio=0.5)
    with pytest.raises(WeightkitError, match="ratio 0.5, got 0.4"):
        pcb_merge(base, deltas, ratio=0.4, stats=stats)
    with pytest.raises(WeightkitError, match="collected for 2 task vectors, got 3"):
        pcb_merge(base, deltas + [deltas[0]], ratio=0.5, stats=stats)
    with pytest.raises(WeightkitError, match="stats must be PCBStats"):
        pcb_merge(base, deltas, ratio=0.5, stats={"ratio": 0.5})
    with pytest.raises(WeightkitError, match="already finished"):
        stats.update(deltas)
    with pytest.raises(WeightkitError, match="already finished"):
        stats.finish_pass()


def test_passes_must_see_the_same_entries():
    deltas = task_vectors(2, (8,), seed=55)
    with pytest.raises(WeightkitError, match="fed no entries"):
        PCBStats(2, 0.5).finish_pass()
    stats = PCBStats(2, 0.5)
    stats.update(deltas)
    stats.finish_pass()
    stats.update([d[:5] for d in deltas])
    with pytest.raises(WeightkitError, match="fed 5 entries, the first pass 8"):
        stats.finish_pass()
