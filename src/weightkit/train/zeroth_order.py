"""MeZO: zeroth-order SGD with in-place perturbations regenerated from a seed (memory of inference).

Malladi, Gao, Nichani, Damian, Lee, Chen, Arora, "Fine-Tuning Language Models with Just Forward Passes",
arXiv 2305.17333.

Each step draws a direction ``z ~ N(0, I)`` over all trained parameters, evaluates the loss at
``theta + eps z`` and ``theta - eps z`` (SPSA), and moves along ``z`` by the estimated directional
derivative ``g = (L+ - L-) / (2 eps)``: ``theta <- theta - lr (g z + weight_decay theta)``. ``z`` is never
stored: it is regenerated from the step's seed each time it is needed (perturb, perturb back, restore,
update), one parameter at a time, so memory is that of inference plus one parameter's noise.

As the paper's Algorithm 1; the loss is any ``closure`` the caller gives (called twice per step, without
gradients). Deliberate deviation: the step's seed is ``seed + step`` (the paper draws fresh random seeds),
so a run is reproducible and resumes from ``state_dict()`` exactly.
"""

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["ZerothOrderSGD", "directions"]


def directions(params: list[Tensor], seed: int):
    """The direction ``z`` of a step, one tensor per parameter in order, regenerated from ``seed`` (each on
    its parameter's device and in its dtype): the same ``seed`` always gives the same ``z``."""
    generators = {}
    for p in params:
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        yield torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)


class ZerothOrderSGD(torch.optim.Optimizer):
    """MeZO-SGD: SGD on the SPSA estimate of the gradient, two forward passes per step, no backward.

    Args:
        params: parameters or parameter groups (every group shares one direction per step).
        lr: learning rate.
        eps: the perturbation scale (the paper uses 1e-3).
        weight_decay: decoupled weight decay, per group.
        seed: step ``t`` perturbs along :func:`directions` with seed ``seed + t``.

    ``step(closure)`` needs ``closure()`` to return the loss at the current parameters (a scalar tensor or
    float; it runs under ``torch.no_grad()``) and returns the mean of the two probes' losses. The
    projected gradient of the last step is ``optimizer.projected_grad``.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise WeightkitError(
                f"ZerothOrderSGD: need lr >= 0, eps > 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}"
            )
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.steps = 0
        self.projected_grad = None

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _move(self, seed: int, scales: list[float]) -> None:
        """``theta += scale_g z`` (``scale_g`` per group), ``z`` regenerated from ``seed``."""
        noise = directions(self._params(), seed)
        for group, scale in zip(self.param_groups, scales, strict=True):
            for p in group["params"]:
                if p.requires_grad:
                    p.add_(next(noise), alpha=scale)

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise WeightkitError("ZerothOrderSGD.step needs a closure that returns the loss")
        seed = self.seed + self.steps
        eps = [group["eps"] for group in self.param_groups]
        if len(set(eps)) > 1:  # one directional derivative per step, measured at one scale
            raise WeightkitError("ZerothOrderSGD: every parameter group must share one eps")
        self._move(seed, eps)
        plus = float(closure())
        self._move(seed, [-2 * e for e in eps])
        minus = float(closure())
        self._move(seed, eps)  # back to theta
        self.projected_grad = (plus - minus) / (2 * eps[0])
        for group in self.param_groups:
            if group["weight_decay"] > 0:
                for p in group["params"]:
                    if p.requires_grad:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
        self._move(seed, [-group["lr"] * self.projected_grad for group in self.param_groups])
        self.steps += 1
        return (plus + minus) / 2

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["zeroth_order"] = {"seed": self.seed, "steps": self.steps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("zeroth_order", None)
        if saved is None:
            raise WeightkitError("this state_dict was not saved by ZerothOrderSGD (no 'zeroth_order' entry)")
        super().load_state_dict(state_dict)
        self.seed, self.steps = saved["seed"], saved["steps"]
