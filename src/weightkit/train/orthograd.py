"""⊥Grad: an optimizer wrapper that removes the part of each weight's gradient along the weight.

Prieto, Barsbey, Mediano, Birdal, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697.

After the training data is fitted, the gradient mostly scales the weights up along their own direction
("naïve loss minimisation"), which leads to softmax collapse and delays generalisation. ⊥Grad uses
``g_perp = g - (<w, g> / <w, w>) w`` (per parameter tensor) and, as the authors' code, rescales it to the
norm of ``g``; any optimizer then steps on it. No deviation.
"""

import torch

from weightkit.errors import WeightkitError
from weightkit.train.common import closure_loss

__all__ = ["OrthoGrad", "orthogonal_gradient"]


def orthogonal_gradient(weight: torch.Tensor, grad: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """``grad`` without its component along ``weight`` (both flattened), rescaled to ``grad``'s norm."""
    w, g = weight.reshape(-1).float(), grad.reshape(-1).float()
    perpendicular = g - (w @ g) / (w @ w + eps) * w
    rescaled = perpendicular * (g.norm() / (perpendicular.norm() + eps))
    return rescaled.reshape(grad.shape).to(grad.dtype)


class OrthoGrad(torch.optim.Optimizer):
    """Wraps an optimizer: before each of its steps, every gradient is replaced by
    :func:`orthogonal_gradient` (``OrthoGrad(torch.optim.AdamW(params, lr=...))`` is the paper's ⊥AdamW).

    Its ``param_groups``, ``state`` and ``state_dict`` are the wrapped optimizer's (so LR schedulers and
    resuming work on the wrapper).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise WeightkitError(f"OrthoGrad wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.copy_(orthogonal_gradient(p, p.grad))
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
