"""MeZO (ZerothOrderSGD): the update is the analytic directional-derivative step on a quadratic, the
parameters come back exactly after the probes, it trains a tiny Llama without gradients, and resumes."""

import copy

import pytest
import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama
from weightkit.train import ZerothOrderSGD
from weightkit.train.zeroth_order import directions


def test_the_update_is_the_directional_derivative_step_on_a_quadratic():
    # For L = 1/2 x^T A x - b^T x the central difference is exact: g = z . (A x - b).
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = a @ a.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    x = nn.Parameter(torch.randn(6, generator=generator, dtype=torch.float64))
    optimizer = ZerothOrderSGD([x], lr=0.05, eps=1e-3, seed=11)
    for step in range(3):
        before = x.detach().clone()
        optimizer.step(lambda: 0.5 * x @ a @ x - b @ x)
        [z] = directions([x], 11 + step)
        g = float(z @ (a @ before - b))
        assert optimizer.projected_grad == pytest.approx(g, rel=1e-9)
        torch.testing.assert_close(x.detach(), before - 0.05 * g * z, rtol=0, atol=1e-12)


def test_it_trains_a_tiny_llama_from_forward_passes_alone():
    model = tiny_llama(seed=0)
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    optimizer = ZerothOrderSGD(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    with torch.no_grad():
        start = float(loss())
    for _ in range(60):
        optimizer.step(loss)
    assert all(p.grad is None for p in model.parameters())  # no backward pass ever ran
    with torch.no_grad():
        assert float(loss()) < start - 0.1


def test_state_dict_resumes_exactly():
    def run(model, optimizer, steps, ids):
        for _ in range(steps):
            optimizer.step(lambda: model(input_ids=ids, labels=ids).loss)

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    whole = tiny_llama(seed=0)
    run(whole, ZerothOrderSGD(whole.parameters(), lr=1e-2, seed=5), 6, ids)
    first = tiny_llama(seed=0)
    optimizer = ZerothOrderSGD(first.parameters(), lr=1e-2, seed=5)
    run(first, optimizer, 3, ids)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed = copy.deepcopy(first)
    optimizer = ZerothOrderSGD(resumed.parameters(), lr=1e-2, seed=99)
    optimizer.load_state_dict(saved)
    run(resumed, optimizer, 3, ids)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_use_is_refused():
    x = nn.Parameter(torch.zeros(2))
    with pytest.raises(WeightkitError, match="eps > 0"):
        ZerothOrderSGD([x], eps=0)
    with pytest.raises(WeightkitError, match="needs a closure"):
        ZerothOrderSGD([x]).step(None)
    with pytest.raises(WeightkitError, match="not saved by ZerothOrderSGD"):
        ZerothOrderSGD([x]).load_state_dict(torch.optim.SGD([x], lr=1).state_dict())
