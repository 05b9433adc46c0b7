"""Curvature of a model's loss: Hessian-vector products, the top Hessian eigenvalues (Lanczos), the Hessian's
spectral density (stochastic Lanczos quadrature), and the linear-mode-connectivity loss barrier.

Papers:

- Sagun, Evci, Güney, Dauphin, Bottou, "Empirical Analysis of the Hessian of Over-Parametrized Neural
  Networks", arXiv 1706.04454: the Hessian's spectrum is a bulk near zero plus a few outliers, the picture
  :func:`hessian_density` draws and :func:`lanczos` measures the outliers of.
- Ghorbani, Krishnan, Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density",
  arXiv 1901.10159: the density estimate followed here, stochastic Lanczos quadrature (SLQ). For each of a
  few random unit probes ``v``, ``m`` Lanczos steps give a tridiagonal ``T``; its eigenvalues (Ritz values)
  ``theta_i`` with weights ``tau_i`` (the squared first components of ``T``'s eigenvectors, summing to one)
  are a Gauss quadrature of ``v^T f(H) v``, whose expectation over probes is ``tr f(H) / D``. Replacing each
  node by a Gaussian of width ``sigma`` and averaging over probes gives a smooth density of the ``D``
  eigenvalues that integrates to one.
- Frankle, Dziugaite, Roy, Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis", arXiv
  1912.05671: evaluate the loss along ``theta(t) = (1 - t) theta_a + t theta_b``. :func:`loss_barrier`
  reports the barrier as Entezari, Sedghi, Saukh, Neyshabur define it ("The Role of Permutation Invariance in
  Linear Mode Connectivity of Neural Networks", arXiv 2110.06296): ``max_t [L(theta(t)) - ((1 - t) L(theta_a)
  + t L(theta_b))]``, the height above the chord. Frankle et al. subtract the mean of the two end losses
  instead; the two agree when the end losses are equal.

The Hessian is never formed: :func:`hessian_operator` differentiates the loss once with ``create_graph=True``
and each product ``H v`` differentiates ``<grad, v>`` again (Pearlmutter's trick), on the model's device.
Memory: the graph of one backward pass, plus, for Lanczos with full reorthogonalisation, ``iterations``
vectors of ``D`` numbers in the parameters' dtype (30 iterations on a 22M-parameter model: 2.6 GB in float32).

Lanczos (:func:`lanczos_tridiagonal`) is the plain three-term recurrence with *full* reorthogonalisation of
every new vector against all earlier ones (done twice, "twice is enough"), so the Ritz values carry no
spurious copies; a fixed number of iterations, a seeded Gaussian start. Being a single-vector Krylov method,
it sees an eigenvalue of multiplicity > 1 once: the top ``k`` are the ``k`` largest *distinct* eigenvalues.
When the Krylov subspace closes before ``iterations`` steps (the residual vanishes), the recurrence stops
there: its Ritz values are then exact eigenvalues.

Deliberate deviations: Ghorbani et al. normalise the density numerically on the grid; here the grid reaches
5 ``sigma`` past the outermost Ritz values, so the density integrates to one by construction (up to the
Gaussian tails beyond 5 sigma, < 1e-6) and the integral is a check, not a fix-up. The kernel width is a
fraction of the spread of all Ritz values (default 1%) rather than a fixed variance, so the plot looks the
same whatever the loss's scale.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightkit.errors import WeightkitError

__all__ = [
    "HessianOperator",
    "hessian_operator",
    "lanczos_tridiagonal",
    "ritz",
    "lanczos",
    "SpectralDensity",
    "slq_density",
    "hessian_eigenvalues",
    "hessian_density",
    "BarrierResult",
    "loss_barrier",
]

# Residual norm, relative to the largest |alpha| or beta met so far, below which the Krylov subspace counts
# as closed (rounding alone leaves residuals of a few machine epsilons times the operator's norm).
_BREAKDOWN = 1e3


def _flat(tensors: Sequence[Tensor | None], params: list[Tensor]) -> Tensor:
    """One vector of the per-parameter ``tensors``; ``None`` (a parameter the loss does not use, so its
    gradient and Hessian rows are zero) as zeros."""
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(tensors, params, strict=True)
        ]
    )


class HessianOperator:
    """``v -> H v`` for the Hessian ``H`` of one loss value w.r.t. ``params`` (flattened and concatenated in
    order), built by :func:`hessian_operator`.

    Attributes:
        dim: ``D``, the number of parameters (the Hessian is ``D x D``).
        device: where the products run (the parameters' device).
        dtype: the dtype of the vectors (the parameters', float32 at least).
        loss: the loss value whose Hessian this is.
    """

    def __init__(self, loss: Tensor, params: list[Tensor]):
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self._grad = _flat(grads, params)
        self._params = params
        self.dim = self._grad.numel()
        self.device = self._grad.device
        self.dtype = torch.promote_types(self._grad.dtype, torch.float32)
        self.loss = float(loss.detach())

    def __call__(self, vector: Tensor) -> Tensor:
        """``H @ vector`` (``vector`` of length :attr:`dim`), in :attr:`dtype` on :attr:`device`."""
        if vector.shape != (self.dim,):
            raise WeightkitError(f"a Hessian-vector product needs a vector of {self.dim} numbers")
        if not self._grad.requires_grad:  # the loss is linear in every parameter: H = 0
            return torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        dot = self._grad @ vector.to(self._grad.dtype)
        products = torch.autograd.grad(dot, self._params, retain_graph=True, allow_unused=True)
        return _flat(products, self._params).to(self.dtype)


def hessian_operator(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], params: list[Tensor] | None = None
) -> HessianOperator:
    """The Hessian-vector product of ``loss_fn(model)`` w.r.t. ``params`` (default: every parameter of
    ``model`` that requires grad), by double backward on the model's device.

    The loss is evaluated once: every product differentiates that same graph, so a model in training mode
    keeps one dropout mask for all of them (put it in eval mode for the Hessian of the deterministic loss).

    Raises:
        WeightkitError: no parameters, or a loss that is not a finite scalar.
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise WeightkitError("the Hessian needs parameters that require grad; the model has none")
    loss = loss_fn(model)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise WeightkitError("the loss function must return a scalar tensor (one loss value)")
    if not torch.isfinite(loss):
        raise WeightkitError(f"the loss is {float(loss.detach())}: its Hessian is undefined")
    if not loss.requires_grad:
        raise WeightkitError(
            "the loss does not depend on the parameters through autograd (computed under torch.no_grad()?)"
        )
    return HessianOperator(loss.reshape(()), params)


def _start_vector(dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Drawn on the CPU so a seed gives the same start on every device.
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (vector / vector.norm()).to(dtype=dtype, device=device)


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor], start: Tensor, iterations: int
) -> tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalisation from ``start``: the tridiagonal ``T`` of the symmetric operator
    ``matvec`` on the Krylov subspace, as its diagonal ``alpha`` (``m``) and off-diagonal ``beta``
    (``m - 1``), float64, with ``m = iterations`` unless the subspace closes earlier.

    The basis is kept in ``start``'s dtype and device (``iterations x D`` numbers); ``T`` in float64.
    """
    if iterations < 1:
        raise WeightkitError(f"Lanczos needs at least one iteration, got {iterations}")
    if iterations > start.numel():
        raise WeightkitError(
            f"{iterations} Lanczos iterations exceed the dimension {start.numel()}: at most that many "
            "orthogonal directions exist"
        )
    basis = torch.empty(iterations, start.numel(), dtype=start.dtype, device=start.device)
    alphas, betas = [], []
    vector = start / start.norm()
    scale = 0.0  # largest |alpha| or beta so far: the operator's norm as far as seen
    for step in range(iterations):
        basis[step] = vector
        residual = matvec(vector).to(start.dtype)
        alpha = float(residual @ vector)
        residual = residual - alpha * vector
        if step:
            residual = residual - betas[-1] * basis[step - 1]
        # Full reorthogonalisation against every earlier vector, twice (one pass leaves O(eps) components
        # that a second pass removes); this keeps the Ritz values free of spurious copies.
        done = basis[: step + 1]
        for _ in range(2):
            residual = residual - done.T @ (done @ residual)
        alphas.append(alpha)
        beta = float(residual.norm())
        scale = max(scale, abs(alpha), beta)
        if step == iterations - 1 or beta <= _BREAKDOWN * torch.finfo(start.dtype).eps * scale:
            break
        betas.append(beta)
        vector = residual / beta
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)


def ritz(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """The Ritz values of the tridiagonal ``T`` (its eigenvalues, ascending) and their quadrature weights
    (the squared first components of its unit eigenvectors; they sum to one)."""
    tridiagonal = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    return values, vectors[0].square()


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    k: int,
    iterations: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> Tensor:
    """The ``k`` largest eigenvalues of the symmetric ``dim x dim`` operator ``matvec``, largest first
    (float64), by ``iterations`` Lanczos steps with full reorthogonalisation from a Gaussian start drawn
    from ``seed``. The outliers converge first; more iterations sharpen the rest.

    Raises:
        WeightkitError: ``k`` outside ``[1, iterations]``, or a Krylov subspace that closed with fewer than
            ``k`` Ritz values (the operator has fewer distinct eigenvalues visible from the start).
    """
    if not 1 <= k <= iterations:
        raise WeightkitError(f"k must be between 1 and the number of iterations ({iterations}), got {k}")
    alpha, beta = lanczos_tridiagonal(
        matvec, _start_vector(dim, seed, dtype, torch.device(device)), iterations
    )
    values, _ = ritz(alpha, beta)
    if values.numel() < k:
        raise WeightkitError(
            f"the Krylov subspace closed after {values.numel()} steps: the operator has only "
            f"{values.numel()} distinct eigenvalues visible from the start vector, fewer than k={k}"
        )
    return values.flip(0)[:k]


@dataclass
class SpectralDensity:
    """A smoothed eigenvalue density (:func:`slq_density`).

    Attributes:
        grid: eigenvalue positions (ascending, evenly spaced).
        density: the density at each grid point (integrates to one over the grid).
        nodes: the Ritz values of every probe, one row per probe (NaN-padded where a probe's subspace closed
            early).
        weights: their quadrature weights (each row sums to one; 0 where padded).
        sigma: the width of the Gaussian that broadens each node.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float

    def curve(self) -> list[tuple[float, float]]:
        """``(eigenvalue, density)`` points for a plot."""
        return list(zip(self.grid.tolist(), self.density.tolist(), strict=True))


def slq_density(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    probes: int = 4,
    iterations: int = 30,
    seed: int = 0,
    grid_points: int = 1000,
    sigma_fraction: float = 0.01,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (module docstring): the eigenvalue density of the symmetric operator
    ``matvec``, from ``probes`` Gaussian start vectors (probe ``i`` drawn from ``seed + i``) of
    ``iterations`` Lanczos steps each, every Ritz value broadened by a Gaussian of width ``sigma_fraction``
    times the spread of all Ritz values, on ``grid_points`` points reaching 5 widths past the extreme ones.
    """
    if probes < 1 or grid_points < 2 or not sigma_fraction > 0:
        raise WeightkitError("slq_density needs probes >= 1, grid_points >= 2 and sigma_fraction > 0")
    device = torch.device(device)
    nodes = torch.full((probes, iterations), math.nan, dtype=torch.float64)
    weights = torch.zeros(probes, iterations, dtype=torch.float64)
    for probe in range(probes):
        start = _start_vector(dim, seed + probe, dtype, device)
        values, probe_weights = ritz(*lanczos_tridiagonal(matvec, start, iterations))
        nodes[probe, : values.numel()], weights[probe, : values.numel()] = values, probe_weights
    found = nodes[~nodes.isnan()]
    low, high = float(found.min()), float(found.max())
    # A spectrum that is one point (a multiple of the identity) still gets a visible width.
    sigma = sigma_fraction * (high - low) if high > low else sigma_fraction * max(abs(high), 1.0)
    grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, grid_points, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes.nan_to_num().reshape(1, -1)) / sigma) ** 2)
    density = kernel @ weights.reshape(-1) / (probes * sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(grid, density, nodes, weights, sigma)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    *,
    k: int = 5,
    iterations: int = 30,
    seed: int = 0,
    params: list[Tensor] | None = None,
) -> Tensor:
    """The ``k`` largest eigenvalues of the Hessian of ``loss_fn(model)`` (:func:`lanczos` over
    :func:`hessian_operator`), largest first, float64."""
    operator = hessian_operator(model, loss_fn, params)
    return lanczos(
        operator, operator.dim, k=k, iterations=iterations, seed=seed, dtype=operator.dtype,
        device=operator.device,
    )  # fmt: skip


def hessian_density(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    *,
    probes: int = 4,
    iterations: int = 30,
    seed: int = 0,
    grid_points: int = 1000,
    sigma_fraction: float = 0.01,
    params: list[Tensor] | None = None,
) -> SpectralDensity:
    """The eigenvalue density of the Hessian of ``loss_fn(model)`` (:func:`slq_density` over
    :func:`hessian_operator`)."""
    operator = hessian_operator(model, loss_fn, params)
    return slq_density(
        operator, operator.dim, probes=probes, iterations=iterations, seed=seed, grid_points=grid_points,
        sigma_fraction=sigma_fraction, dtype=operator.dtype, device=operator.device,
    )  # fmt: skip


@dataclass
class BarrierResult:
    """The loss along the straight line between two weight vectors (:func:`loss_barrier`).

    Attributes:
        ts: the interpolation points ``t`` (0 is ``state_a``, 1 is ``state_b``).
        losses: the loss at each.
        barrier: ``max_t [L(t) - ((1 - t) L(0) + t L(1))]``; 0 for a path that never rises above the chord.
        barrier_t: the ``t`` where that maximum is.
    """

    ts: list[float]
    losses: list[float]
    barrier: float
    barrier_t: float

    def curve(self) -> list[tuple[float, float]]:
        """``(t, loss)`` points for a plot."""
        return list(zip(self.ts, self.losses, strict=True))


def _check_states(
    model_state: Mapping[str, Tensor], a: Mapping[str, Tensor], b: Mapping[str, Tensor]
) -> None:
    for name, state in (("state_a", a), ("state_b", b)):
        missing = sorted(set(model_state) - set(state))
        extra = sorted(set(state) - set(model_state))
        if missing or extra:
            raise WeightkitError(
                f"{name} does not match the model's state: missing {missing[:5]}, unexpected {extra[:5]}"
            )
    for name, tensor in model_state.items():
        if a[name].shape != tensor.shape or b[name].shape != tensor.shape:
            raise WeightkitError(
                f"{name}: shapes differ (model {tuple(tensor.shape)}, state_a {tuple(a[name].shape)}, "
                f"state_b {tuple(b[name].shape)})"
            )


def loss_barrier(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    loss_fn: Callable[[nn.Module], float],
    *,
    points: int = 11,
) -> BarrierResult:
    """Evaluate ``loss_fn(model)`` at ``points`` evenly spaced ``t`` in ``[0, 1]`` with the model's weights
    set to ``(1 - t) state_a + t state_b``, and the barrier above the chord (module docstring).

    The model's floating-point parameters are interpolated (``torch.lerp``: exactly ``state_a`` at 0 and
    ``state_b`` at 1); everything else in its state (buffers such as running statistics, integer tensors) is
    ``state_a``'s all along. The model's own state is put back afterwards, even when ``loss_fn`` raises.
    ``loss_fn`` runs as given: put the model in eval mode and under ``torch.no_grad()`` there if wanted.

    Raises:
        WeightkitError: fewer than 2 points, states whose names or shapes differ from the model's, or a loss
            that is not finite.
    """
    if points < 2:
        raise WeightkitError(f"the loss barrier needs at least 2 points (the two ends), got {points}")
    saved = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    _check_states(saved, state_a, state_b)
    # Tied parameters appear under each of their names in the state dict: every name is interpolated alike.
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    ts = torch.linspace(0, 1, points, dtype=torch.float64).tolist()
    losses = []
    try:
        for t in ts:
            state = {}
            for name, tensor in saved.items():
                a = state_a[name].to(tensor.device)
                moves = name in parameters and a.is_floating_point()
                state[name] = torch.lerp(a, state_b[name].to(a.device, a.dtype), t) if moves else a
            model.load_state_dict(state)
            loss = float(loss_fn(model))
            if not math.isfinite(loss):
                raise WeightkitError(f"the loss is {loss} at t={t:g} on the path between the two states")
            losses.append(loss)
    finally:
        model.load_state_dict(saved)
    heights = [loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(ts, losses, strict=True)]
    top = max(range(points), key=heights.__getitem__)
    return BarrierResult(ts, losses, heights[top], ts[top])
