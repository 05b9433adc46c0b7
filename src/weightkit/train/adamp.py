"""AdamP and SGDP: momentum optimizers that do not inflate the norm of scale-invariant weights.

Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", arXiv 2006.08217.

A weight followed by a normalisation (BatchNorm, LayerNorm without affine parameters on its output ...)
is scale-invariant: the loss does not change when it is scaled, so its gradient is orthogonal to it. A
momentum update then still has a radial part (the momentum of earlier gradients), which grows the weight's
norm and shrinks its effective step size. AdamP/SGDP detect such weights and remove the radial component
of the update: per output channel, and failing that for the whole tensor, if every cosine similarity
between the gradient and the weight is below ``delta / sqrt(dim)`` (the weight looks scale-invariant),
the update is projected onto the tangent space of the weight (``u - w_hat <w_hat, u>``, ``w_hat`` the
unit-norm weight) and the weight decay is multiplied by ``wd_ratio``. Other weights, 1-D ones (biases,
norm scales) always, get plain Adam / SGD with momentum.

Deliberate deviations from the paper: none. The Adam step is PyTorch's (``eps`` added to the bias-corrected
``sqrt(v)``), as in the authors' code; weight decay is decoupled (applied to the weight before the step).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.train.common import closure_loss

__all__ = ["AdamP", "SGDP", "radial_projection"]


def radial_projection(
    weight: Tensor, grad: Tensor, update: Tensor, delta: float, eps: float
) -> Tensor | None:
    """``update`` without its component along ``weight``, if the weight looks scale-invariant; else None.

    Tried per output channel (each row of the weight flattened beyond dim 0), then for the whole tensor:
    the weight looks scale-invariant under a view when every |cosine| between the gradient and the weight
    rows of that view is below ``delta / sqrt(row length)``.
    """
    for rows in (weight.shape[0], 1):
        w, g, u = weight.reshape(rows, -1), grad.reshape(rows, -1), update.reshape(rows, -1)
        cosine = F.cosine_similarity(g, w, dim=1, eps=eps).abs()
        if cosine.max() < delta / math.sqrt(w.shape[1]):
            unit = w / w.norm(dim=1, keepdim=True).add(eps)
            return (u - unit * (unit * u).sum(dim=1, keepdim=True)).reshape(update.shape)
    return None


def _check(lr: float, eps: float, weight_decay: float, delta: float, wd_ratio: float) -> None:
    if lr < 0 or eps < 0 or weight_decay < 0 or delta < 0 or not 0 <= wd_ratio <= 1:
        raise WeightkitError(
            f"need lr, eps, weight_decay, delta >= 0 and wd_ratio in [0, 1], got lr={lr}, eps={eps}, "
            f"weight_decay={weight_decay}, delta={delta}, wd_ratio={wd_ratio}"
        )


class AdamP(torch.optim.Optimizer):
    """Adam(W) with AdamP's radial projection for scale-invariant weights (module docstring).

    Args:
        params: parameters or parameter groups.
        lr, betas, eps: Adam's.
        weight_decay: decoupled weight decay; multiplied by ``wd_ratio`` for a projected weight.
        delta: the scale-invariance threshold on the gradient-weight cosine (times ``sqrt(dim)``).
        wd_ratio: the weight decay factor of projected weights.
        nesterov: Nesterov momentum in the update direction.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
                 wd_ratio=0.1, nesterov=False):  # fmt: skip
        _check(lr, eps, weight_decay, delta, wd_ratio)
        if not all(0 <= b < 1 for b in betas):
            raise WeightkitError(f"AdamP: betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                correction1, correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                denom = (exp_avg_sq.sqrt() / math.sqrt(correction2)).add_(group["eps"])
                momentum = beta1 * exp_avg + (1 - beta1) * grad if group["nesterov"] else exp_avg
                update = momentum / denom
                _apply(p, grad, update, group, step_size=group["lr"] / correction1)
        return loss


class SGDP(torch.optim.Optimizer):
    """SGD with momentum and SGDP's radial projection for scale-invariant weights (module docstring).

    Args:
        params: parameters or parameter groups.
        lr, momentum, dampening, nesterov: SGD's (as ``torch.optim.SGD``).
        weight_decay: decoupled weight decay (divided by ``1 - dampening``, as the authors' code);
            multiplied by ``wd_ratio`` for a projected weight.
        eps, delta, wd_ratio: as :class:`AdamP`.
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 eps=1e-8, delta=0.1, wd_ratio=0.1):  # fmt: skip
        _check(lr, eps, weight_decay, delta, wd_ratio)
        if momentum < 0 or not 0 <= dampening < 1:
            raise WeightkitError(
                f"SGDP: need momentum >= 0, dampening in [0, 1), got {momentum}, {dampening}"
            )
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            momentum, dampening = group["momentum"], group["dampening"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(grad, alpha=1 - dampening)
                buf = state["momentum_buffer"]
                update = grad + momentum * buf if group["nesterov"] else buf.clone()
                decay = {**group, "weight_decay": group["weight_decay"] / (1 - dampening)}
                _apply(p, grad, update, decay, step_size=group["lr"])
        return loss


def _apply(p: Tensor, grad: Tensor, update: Tensor, group: dict, *, step_size: float) -> None:
    """Project ``update`` if ``p`` looks scale-invariant, decay ``p`` (less if projected), then step."""
    decay = group["weight_decay"]
    if p.dim() > 1:
        projected = radial_projection(p, grad, update, group["delta"], group["eps"])
        if projected is not None:
            update, decay = projected, decay * group["wd_ratio"]
    if decay > 0:
        p.mul_(1 - group["lr"] * decay)
    p.add_(update, alpha=-step_size)
