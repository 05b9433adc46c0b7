"""AdamP and SGDP: Adam's and SGD's steps for ordinary weights, no radial update (and slower norm growth)
for scale-invariant ones, as the paper claims."""

import pytest
import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.train import SGDP, AdamP
from weightkit.train.adamp import radial_projection

X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))


def _regression(weight):  # not scale-invariant: the gradient has a large radial part
    return ((X @ weight.T - Y) ** 2).mean()


def _normalised(weight):  # scale-invariant: the loss sees only each row's direction
    rows = weight / weight.norm(dim=1, keepdim=True)
    return ((X @ rows.T - Y) ** 2).mean()


def _run(optimizer_cls, loss, steps=20, **kwargs):
    weight = nn.Parameter(torch.randn(8, 16, generator=torch.Generator().manual_seed(2)))
    optimizer = optimizer_cls([weight], **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(weight).backward()
        optimizer.step()
    return weight.detach()


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        (AdamP, torch.optim.Adam, {"lr": 1e-2}),
        (AdamP, torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.99)}),
        (SGDP, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
        (SGDP, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    ],
)
def test_updates_of_weights_that_are_not_scale_invariant_are_adams_and_sgds(ours, theirs, kwargs):
    torch.testing.assert_close(_run(ours, _regression, **kwargs), _run(theirs, _regression, **kwargs))


@pytest.mark.parametrize("optimizer", [AdamP, SGDP])
def test_scale_invariant_weights_get_no_radial_update_and_keep_their_norm(optimizer):
    kwargs = {"lr": 0.1, "momentum": 0.9} if optimizer is SGDP else {"lr": 0.05}
    plain = torch.optim.SGD if optimizer is SGDP else torch.optim.Adam
    start = _run(plain, _normalised, steps=0)
    ours, theirs = _run(optimizer, _normalised, **kwargs), _run(plain, _normalised, **kwargs)
    # Each projected step is orthogonal to its row: the norm grows by second order only, while plain
    # momentum grows it (the paper's Figure 1: the effective step size shrinks as the norm grows).
    growth = {
        name: float((w.norm(dim=1) / start.norm(dim=1)).mean())
        for name, w in (("ours", ours), ("plain", theirs))
    }
    assert growth["ours"] - 1 < 0.25 * (growth["plain"] - 1), growth
    assert _normalised(ours) < _normalised(start)


def test_the_projection_removes_exactly_the_radial_component_per_row():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 16, generator=generator)
    rows = weight / weight.norm(dim=1, keepdim=True)
    grad = torch.randn(8, 16, generator=generator)
    grad -= rows * (rows * grad).sum(dim=1, keepdim=True)  # orthogonal to each row: scale-invariant
    update = torch.randn(8, 16, generator=generator)
    projected = radial_projection(weight, grad, update, delta=0.1, eps=1e-8)
    torch.testing.assert_close((projected * rows).sum(dim=1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(projected, update - rows * (rows * update).sum(dim=1, keepdim=True))
    assert radial_projection(weight, weight, update, delta=0.1, eps=1e-8) is None  # radial gradient


def test_bad_hyperparameters_are_refused():
    weight = nn.Parameter(torch.randn(2, 2))
    with pytest.raises(WeightkitError, match="wd_ratio in \\[0, 1\\]"):
        AdamP([weight], wd_ratio=2)
    with pytest.raises(WeightkitError, match="betas"):
        AdamP([weight], betas=(1.0, 0.9))
    with pytest.raises(WeightkitError, match="dampening"):
        SGDP([weight], lr=0.1, dampening=1.0)
