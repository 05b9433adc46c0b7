"""What the optimizers of :mod:`weightkit.train` share."""

import torch

__all__ = ["closure_loss"]


def closure_loss(closure):
    """``closure()`` with gradients enabled (``Optimizer.step`` runs under ``no_grad``), or None without one:
    the loss an optimizer's ``step(closure)`` returns."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
