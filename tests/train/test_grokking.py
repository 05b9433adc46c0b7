"""StableMax and ⊥Grad ("Grokking at the Edge of Numerical Stability"): StableMax keeps gradients where
softmax cross-entropy collapses to exactly zero in float32; ⊥Grad's update is orthogonal to the weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.train import OrthoGrad, stablemax, stablemax_cross_entropy


def test_stablemax_is_a_distribution_built_on_the_papers_s():
    logits = torch.tensor([[-3.0, -0.5, 0.0, 0.5, 4.0]])
    s = torch.tensor([[1 / 4, 1 / 1.5, 1.0, 1.5, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(stablemax(logits), s / s.sum())
    assert stablemax(torch.randn(4, 7)).sum(dim=-1).allclose(torch.ones(4, dtype=torch.float64))


def test_stablemax_keeps_the_gradient_that_softmax_collapse_zeroes():
    # A fitted sample: the correct logit 120 ahead. In float32 softmax's loss and gradient are exactly 0.
    logits = torch.tensor([[120.0, 0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0])
    F.cross_entropy(logits, targets).backward()
    assert torch.count_nonzero(logits.grad) == 0
    logits.grad = None
    loss = stablemax_cross_entropy(logits, targets)
    loss.backward()
    assert loss > 0 and torch.count_nonzero(logits.grad) == 4


def test_stablemax_cross_entropy_skips_ignored_targets():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, -100, 4], [0, 2, -100]])
    kept = targets != -100
    expected = -stablemax(logits[kept]).gather(1, targets[kept].unsqueeze(1)).log().mean()
    torch.testing.assert_close(stablemax_cross_entropy(logits, targets), expected.float())


def test_orthograd_steps_orthogonally_to_the_weight_with_the_gradients_norm():
    weight = nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    optimizer = OrthoGrad(torch.optim.SGD([weight], lr=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    before = weight.detach().clone()
    (x @ weight.T).square().mean().backward()  # its gradient is mostly along the weight
    grad_norm = weight.grad.norm()
    optimizer.step()
    update = weight.detach() - before
    assert abs(float((update * before).sum())) < 1e-5 * float(update.norm() * before.norm())
    torch.testing.assert_close(update.norm(), 0.1 * grad_norm)
    scheduler.step()  # a scheduler of the wrapper sets the wrapped optimizer's learning rate
    assert optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_orthograd_wraps_optimizers_only():
    with pytest.raises(WeightkitError, match="wraps a torch.optim.Optimizer"):
        OrthoGrad([nn.Parameter(torch.zeros(1))])
