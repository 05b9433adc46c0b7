"""Tests for weightkit.merge.mwa: Metrics-Weighted Averaging weights and merge.

The formula (a reconstruction of arXiv 2504.18580, see the module docstring) is written here directly:
``w_i = L_i^(-p) / sum_j L_j^(-p)`` for losses, ``w_i = s_i^p / sum_j s_j^p`` for steps.
"""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.mwa import mwa_merge, mwa_weights


def reference_weights(metrics, kind, penalty):
    raw = [m**-penalty if kind == "loss" else m**penalty for m in metrics]
    return [r / sum(raw) for r in raw]


@pytest.mark.parametrize("penalty", [0.0, 0.5, 0.7, 1.0, 3.0])
@pytest.mark.parametrize(
    ("kind", "metrics"),
    [("loss", [1.21, 0.95, 0.88, 0.91]), ("loss", [2.5]), ("step", [100, 200, 300, 400, 500]), ("step", [7])],
)
def test_weights_follow_the_formula(kind, metrics, penalty):
    got = mwa_weights(metrics, kind=kind, penalty=penalty)
    expected = reference_weights(metrics, kind, penalty)
    assert len(got) == len(metrics)
    assert got == pytest.approx(expected, rel=1e-12)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["loss", "step"])
def test_penalty_zero_is_the_uniform_average(kind):
    assert mwa_weights([3.0, 1.0, 2.0, 5.0], kind=kind, penalty=0.0) == [0.25] * 4


def test_lower_loss_and_later_step_weigh_more():
    losses = [0.9, 0.5, 1.4, 0.7]
    weights = mwa_weights(losses, kind="loss", penalty=1.0)
    order_by_loss = sorted(range(4), key=lambda i: losses[i])
    order_by_weight = sorted(range(4), key=lambda i: -weights[i])
    assert order_by_loss == order_by_weight
    steps = [300, 100, 400, 200]
    weights = mwa_weights(steps, kind="step", penalty=1.0)
    assert sorted(range(4), key=lambda i: -steps[i]) == sorted(range(4), key=lambda i: -weights[i])
    # Equal metrics, equal weights.
    tied = mwa_weights([0.5, 0.5, 0.8], kind="loss", penalty=2.0)
    assert tied[0] == tied[1] > tied[2]


@pytest.mark.parametrize(("kind", "metrics"), [("loss", [1.2, 0.9, 0.8, 1.0]), ("step", [10, 20, 30, 40])])
def test_bigger_penalty_concentrates_the_weight(kind, metrics):
    best = 2 if kind == "loss" else 3
    previous_best, previous_entropy = 0.0, math.inf
    for penalty in [0.0, 0.5, 1.0, 2.0, 5.0, 20.0]:
        weights = mwa_weights(metrics, kind=kind, penalty=penalty)
        entropy = -sum(w * math.log(w) for w in weights if w > 0)
        assert weights[best] > previous_best or penalty == 0.0
        assert entropy < previous_entropy
        previous_best, previous_entropy = weights[best], entropy
    # In the limit only the best checkpoint is left, without overflow.
    weights = mwa_weights(metrics, kind=kind, penalty=1e4)
    assert weights[best] == pytest.approx(1.0) and all(math.isfinite(w) for w in weights)


def test_weights_depend_only_on_metric_ratios():
    a = mwa_weights([0.4, 0.6, 0.5], kind="loss", penalty=1.5)
    b = mwa_weights([4.0, 6.0, 5.0], kind="loss", penalty=1.5)
    assert a == pytest.approx(b, rel=1e-12)


def test_a_step_zero_checkpoint_gets_no_weight():
    assert mwa_weights([0, 10, 30], kind="step", penalty=1.0) == pytest.approx([0.0, 0.25, 0.75])
    assert mwa_weights([0, 10, 30], kind="step", penalty=0.0) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize(
    ("metrics", "kind", "penalty", "message"),
    [
        ([], "loss", 1.0, "at least one checkpoint"),
        ([1.0], "accuracy", 1.0, "unknown MWA kind"),
        ([1.0, float("nan")], "loss", 1.0, "checkpoint 1 is nan"),
        ([1.0, float("inf")], "step", 1.0, "must be finite"),
        ([1.0, 0.0], "loss", 1.0, "losses > 0"),
        ([1.0, -0.5], "loss", 1.0, "losses > 0"),
        ([10, -1], "step", 1.0, "steps must be >= 0"),
        ([0, 0], "step", 1.0, "every checkpoint is at step 0"),
        ([1.0, 2.0], "loss", -1.0, "penalty factor"),
        ([1.0, 2.0], "loss", float("nan"), "penalty factor"),
    ],
)
def test_bad_input_is_refused(metrics, kind, penalty, message):
    with pytest.raises(WeightkitError, match=message):
        mwa_weights(metrics, kind=kind, penalty=penalty)


def test_merge_is_the_weighted_average():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    losses = [1.0, 0.5, 0.25]
    got = mwa_merge(tensors, losses, kind="loss", penalty=1.0)
    # Weights 1:2:4, i.e. 1/7, 2/7, 4/7.
    expected = (tensors[0] + 2 * tensors[1] + 4 * tensors[2]) / 7
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(WeightkitError, match="3 tensors but 2 metrics"):
        mwa_merge(tensors, losses[:2], kind="loss", penalty=1.0)
