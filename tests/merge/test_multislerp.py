"""Tests for weightkit.merge.multislerp against mergekit's algorithm (tangent step too) in Python floats."""

import math

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.merge.multislerp import MultiSlerpConfig, multislerp
from weightkit.registry import config_from_dict


def multislerp_reference(tensors, weights, base=None, normalize=True, eps=1e-8):
    """mergekit's multislerp step by step: unit points, weighted mean, tangent projection, exponential map."""
    vs = [
        [
            x - (b if base is not None else 0.0)
            for x, b in zip(t.reshape(-1).tolist(), _flat(base, t), strict=True)
        ]
        for t in tensors
    ]
    ws = [w / sum(weights) for w in weights] if normalize else list(weights)
    norms = [math.sqrt(sum(x * x for x in v)) for v in vs]
    units = [[x / (n + eps) for x in v] for v, n in zip(vs, norms, strict=True)]
    mean = [sum(w * u[i] for w, u in zip(ws, units, strict=True)) for i in range(len(vs[0]))]
    mean_norm = math.sqrt(sum(m * m for m in mean))
    mean = [m / mean_norm for m in mean]
    tangent = [0.0] * len(mean)
    for w, u in zip(ws, units, strict=True):
        d = sum(x * m for x, m in zip(u, mean, strict=True))
        tangent = [tg + w * (x - d * m) for tg, x, m in zip(tangent, u, mean, strict=True)]
    tn = math.sqrt(sum(x * x for x in tangent)) + eps
    out = [m * math.cos(tn) + x * math.sin(tn) / tn for m, x in zip(mean, tangent, strict=True)]
    scale = sum(w * n for w, n in zip(ws, norms, strict=True))
    out = [x * scale + b for x, b in zip(out, _flat(base, tensors[0]), strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(tensors[0].shape)


def _flat(base, like):
    return base.reshape(-1).tolist() if base is not None else [0.0] * like.numel()


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(with_base, normalize):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    tensors = [base + 0.3 * torch.randn(5, 6, generator=g) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    expected = multislerp_reference(tensors, weights, base if with_base else None, normalize)
    got = multislerp(
        [t.clone() for t in tensors], weights, base=base if with_base else None, normalize_weights=normalize
    )
    assert got.shape == base.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_tangent_step_changes_nothing_so_the_result_is_the_mean_direction_at_the_mean_norm():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(40, generator=g) * s for s in (1.0, 2.0, 0.5)]
    weights = [0.2, 0.3, 0.5]
    exact = [t.double() for t in tensors]
    direction = sum(w * t / t.norm() for w, t in zip(weights, exact, strict=True))
    expected = direction / direction.norm() * sum(w * t.norm() for w, t in zip(weights, exact, strict=True))
    got = multislerp([t.clone() for t in tensors], weights)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


def test_orthogonal_unit_vectors_average_on_the_sphere():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    got = multislerp([a.clone(), b.clone()], [1.0, 1.0])
    # A linear average would have norm 0.707.
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))


def test_identical_tensors_give_that_tensor_and_one_tensor_is_returned_as_is():
    t = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(multislerp([t.clone() for _ in range(3)], [1.0, 2.0, 3.0]), t)
    one = t.clone()
    assert multislerp([one], [5.0]) is one


def test_cancelling_directions_fall_back_like_mergekit():
    a = torch.tensor([1.0, 2.0, -1.0])
    base = torch.tensor([0.5, 0.5, 0.5])
    # Two opposite task vectors with equal weights: the weighted sum of the task vectors (0), plus the base.
    got = multislerp([base + a, base - a], [1.0, 1.0], base=base)
    torch.testing.assert_close(got, base)
    # Three models whose directions cancel: mergekit stops, and so does weightkit, naming the tensor.
    with pytest.raises(WeightkitError, match="at model.norm.weight the weighted directions"):
        multislerp([a.clone(), -a, 2 * a], [1.0, 2.0, 1.0], name="model.norm.weight")
    # ... unless no model changed the tensor at all: then the base (mergekit stops there too).
    torch.testing.assert_close(multislerp([base.clone() for _ in range(3)], [1.0, 1.0, 1.0], base=base), base)


def test_weights_that_sum_to_zero_are_refused_when_normalised():
    with pytest.raises(WeightkitError, match="sum to zero"):
        multislerp([torch.ones(2), torch.zeros(2)], [1.0, -1.0])


def test_config_options():
    config = config_from_dict("merge", {"method": "multislerp", "normalize_weights": False, "eps": 1e-6})
    assert config == MultiSlerpConfig(normalize_weights=False, eps=1e-6)
    with pytest.raises(WeightkitError, match="normalize_weights must be true or false"):
        MultiSlerpConfig(normalize_weights=[{"filter": "mlp", "value": True}])
    with pytest.raises(WeightkitError, match="eps must be a number"):
        MultiSlerpConfig(eps=[1e-8, 1e-6])
