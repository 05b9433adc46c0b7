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

import math

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["ZerothOrderSGD", "DistributedZerothOrderSGD", "directions"]

# The one-byte code of a NaN/Inf projected gradient (finite ones are clipped to [-127, 127]).
_NOT_FINITE = -128


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
    projected gradient of the last step is ``optimizer.projected_grad``. A step whose loss is NaN or
    infinite is not applied (the parameters are back where they were, to within rounding, and the step is
    not counted): the caller sees the non-finite loss and decides.
    """

    # No backward pass: training loops call step(closure) instead (weightkit.runtime.training).
    forward_only = True

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

    def _probe(self, seed: int, closure) -> tuple[float, float] | None:
        """The mean probe loss and the projected gradient along ``seed``'s direction; theta is moved back
        (to within rounding). With ``closure=None`` only the moves are made."""
        eps = [group["eps"] for group in self.param_groups]
        if len(set(eps)) > 1:  # one directional derivative per step, measured at one scale
            raise WeightkitError("zeroth-order SGD: every parameter group must share one eps")
        self._move(seed, eps)
        plus = None if closure is None else float(closure())
        self._move(seed, [-2 * e for e in eps])
        minus = None if closure is None else float(closure())
        self._move(seed, eps)  # back to theta
        return None if closure is None else ((plus + minus) / 2, (plus - minus) / (2 * eps[0]))

    def _decay(self) -> None:
        for group in self.param_groups:
            if group["weight_decay"] > 0:
                for p in group["params"]:
                    if p.requires_grad:
                        p.mul_(1 - group["lr"] * group["weight_decay"])

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise WeightkitError("ZerothOrderSGD.step needs a closure that returns the loss")
        seed = self.seed + self.steps
        loss, self.projected_grad = self._probe(seed, closure)
        if not math.isfinite(self.projected_grad):
            return loss
        self._decay()
        self._move(seed, [-group["lr"] * self.projected_grad for group in self.param_groups])
        self.steps += 1
        return loss

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


class DistributedZerothOrderSGD(ZerothOrderSGD):
    """MeZO over ``torch.distributed`` processes that exchange only scalars ("Just One Byte (per gradient)").

    Zelikman, Huang, Liang, Haber, Goodman, "Just One Byte (per gradient): A Note on Low-Bandwidth
    Decentralized Language Model Finetuning Using Shared Randomness", arXiv 2306.10015.

    At step ``t`` process ``r`` of ``N`` probes its own direction (seed ``seed + t N + r``) on its own data
    (its ``closure``), the ``N`` projected gradients are all-gathered, and every process applies all of
    them in rank order, each along its direction regenerated from its seed:
    ``theta <- theta - (lr / N) sum_r g_r z_r``. Every process also replays every other process's probe
    moves (perturb, perturb back: they do not cancel exactly in floating point), so all compute the same
    operations on the same numbers and the copies stay bit-identical, while the only traffic is ``N``
    scalars per step (one process is :class:`ZerothOrderSGD`). ``bytes_exchanged`` counts what one
    process received in the last step.

    ``one_byte=scale`` sends each projected gradient as one signed byte, ``round(g / scale)`` clipped to
    [-127, 127] (-128 for a NaN/Inf), and every process (the sender too) applies the decoded ``q * scale``.
    A step in which any process's loss is NaN/Inf is applied by none. The paper exchanges one
    byte per projected gradient; this linear code with a fixed ``scale`` is weightkit's choice, as is the
    seed ``seed + t N + r`` (the paper seeds by machine and sample).
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 one_byte: float | None = None):  # fmt: skip
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise WeightkitError(
                "DistributedZerothOrderSGD needs a torch.distributed process group: launch with torchrun "
                "and call weightkit.runtime.distributed.init_distributed first"
            )
        if one_byte is not None and one_byte <= 0:
            raise WeightkitError(f"one_byte is the code's step and must be > 0, got {one_byte}")
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed)
        self.one_byte = one_byte
        self.bytes_exchanged = 0

    def _exchange(self, grad: float) -> list[float]:
        """Every process's projected gradient, by rank, as every process applies it."""
        world = torch.distributed.get_world_size()
        if self.one_byte is None:
            local = torch.tensor([grad], dtype=torch.float64)
        else:
            code = max(-127, min(127, round(grad / self.one_byte))) if math.isfinite(grad) else _NOT_FINITE
            local = torch.tensor([code], dtype=torch.int8)
        gathered = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(gathered, local)
        self.bytes_exchanged = world * local.element_size()
        if self.one_byte is None:
            return [float(g) for g in gathered]
        return [math.nan if int(q) == _NOT_FINITE else int(q) * self.one_byte for q in gathered]

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise WeightkitError("DistributedZerothOrderSGD.step needs a closure that returns the loss")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        seeds = [self.seed + self.steps * world + r for r in range(world)]
        # Every process makes every process's probe moves, in rank order, evaluating the loss only at its
        # own: a move and its undoing round, so the parameters stay bit-identical only if every process
        # rounds the same sequence of moves.
        for r, seed in enumerate(seeds):
            if r == rank:
                loss, grad = self._probe(seed, closure)
            else:
                self._probe(seed, None)
        grads = self._exchange(grad)
        self.projected_grad = grads
        if not all(math.isfinite(g) for g in grads):
            return loss
        self._decay()
        for seed, g in zip(seeds, grads, strict=True):
            self._move(seed, [-group["lr"] * g / world for group in self.param_groups])
        self.steps += 1
        return loss
