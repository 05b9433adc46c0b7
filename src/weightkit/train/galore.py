"""GaLore: AdamW whose moments live in a low-rank projection of each matrix's gradient.

Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507.

The gradient ``G`` (``m x n``) of a weight matrix is projected onto the top-``rank`` singular subspace of a
recent gradient: ``R = G P^T`` with ``P`` the first ``rank`` right singular vectors (``rank x n``) when
``m >= n``, else ``R = P^T G`` with ``P`` the first ``rank`` left singular vectors (``m x rank``). Adam's
two moments are kept for ``R`` (``m x rank`` or ``rank x n``: ``rank x max(m, n)`` each), and the normalised
step is projected back (``N P`` or ``P N``) and scaled by ``scale``. ``P`` is recomputed from the current
gradient every ``update_proj_gap`` steps (first at step 0). Per projected matrix the state is two
``rank x max(m, n)`` moments and one ``min(m, n) x rank`` projection, against AdamW's two ``m x n``.

As the reference code (galore-torch's ``GaLoreAdamW``), on which the group keys are modelled so that its
users' code runs after changing the import: a parameter group with a ``rank`` key is projected
(``rank``, ``update_proj_gap``, ``scale``, ``proj_type``); other groups (norms, embeddings ...) are plain
AdamW. The Adam step is the reference's (transformers' ``AdamW``: ``eps`` added to ``sqrt(v)`` before the
bias correction, decoupled weight decay applied to the weight after the step).

Deliberate deviations from the reference:

1. ``state_dict()``/``load_state_dict()`` work: the projection is a tensor in the parameter's state (the
   reference keeps a projector object there, which does not survive saving), so a resumed run continues
   bit for bit.
2. ``proj_type="full"`` (projection on both sides) is refused by name rather than implemented.
3. ``basis="dct"`` (a group key) is the SVD-free variant of "SVD-Free Low-Rank Adaptive Gradient
   Optimization for Large Language Models": instead of an SVD of the gradient, the ``rank`` vectors of a
   fixed orthonormal DCT-II basis that capture most of the gradient's energy (``||G d_k||``), chosen again
   at each refresh; the state holds their indices, not a projection matrix (the basis is shared by every
   matrix of that size and computed once).
4. Q-GaLore's options ("Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
   Gradients", arXiv 2407.08296), as group keys: ``proj_bits`` (8 or 4) stores the projection as
   symmetric round-to-nearest codes with one scale per basis vector (4-bit codes two to a byte);
   ``cos_threshold`` (with ``queue_size``, default 5) compares each new projection with the one it replaces
   (the mean |cosine| of corresponding basis vectors) and, once the last ``queue_size`` comparisons average
   at least the threshold, doubles that parameter's refresh gap: a layer whose subspace has stopped
   moving takes fewer SVDs. Q-GaLore's INT8 weights with stochastic rounding are not part of this.
5. ``per_layer=True`` updates each parameter as soon as its gradient is accumulated (a
   ``post_accumulate_grad`` hook) and frees that gradient at once, so the full gradient never exists
   (the reference shows this in an example with one optimizer per parameter); ``step()`` then only
   counts steps. Gradient accumulation over several backward passes is not possible in this mode.
"""

import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from weightkit.errors import WeightkitError
from weightkit.train.common import closure_loss

__all__ = [
    "GaLoreAdamW",
    "galore_param_groups",
    "galore_state_bytes",
    "projection",
    "project",
    "project_back",
    "dct_basis",
    "dct_columns",
    "dct_projection",
]

_PROJ_TYPES = ("std", "reverse_std", "left", "right")


def _side(shape: torch.Size, proj_type: str) -> str:
    """Which side of an ``m x n`` gradient the projection acts on: ``"right"`` (``G P^T``) or ``"left"``."""
    wide = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if wide else "left"
    if proj_type == "reverse_std":
        return "left" if wide else "right"
    return proj_type


def projection(grad: Tensor, rank: int, side: str) -> Tensor:
    """The top-``rank`` singular subspace of ``grad`` on ``side``: ``rank x n`` right singular vectors (rows)
    or ``m x rank`` left singular vectors (columns), in ``grad``'s dtype, computed in float32."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = vh[:rank] if side == "right" else u[:, :rank]
    # A copy of its own: the slice would keep all of u or vh alive in the optimizer's state.
    return basis.clone(memory_format=torch.contiguous_format).to(grad.dtype)


@functools.cache
def _dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The orthonormal DCT-II matrix (``n x n``, rows the basis vectors), built in float64 and kept once per
    size, dtype and device (every step of every matrix of that size reads it)."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix.to(device=device, dtype=dtype)


def dct_basis(n: int, like: Tensor) -> Tensor:
    """The orthonormal DCT-II basis of size ``n`` (rows), in ``like``'s dtype and on its device."""
    return _dct_matrix(n, like.dtype, like.device)


def dct_columns(grad: Tensor, rank: int, side: str) -> Tensor:
    """SVD-free GaLore's choice: the ``rank`` DCT basis vectors (of the projected side) that capture the
    most of ``grad``'s energy, as sorted indices."""
    if side == "right":
        energy = (grad.float() @ dct_basis(grad.shape[1], grad.float()).T).square().sum(dim=0)
    else:
        energy = (dct_basis(grad.shape[0], grad.float()) @ grad.float()).square().sum(dim=1)
    return energy.topk(rank).indices.sort().values


def dct_projection(grad: Tensor, columns: Tensor, side: str) -> Tensor:
    """The projection of the chosen DCT vectors, shaped as :func:`projection`'s (``rank x n`` right,
    ``m x rank`` left)."""
    if side == "right":
        return dct_basis(grad.shape[1], grad)[columns]
    return dct_basis(grad.shape[0], grad)[columns].T


def project(grad: Tensor, basis: Tensor, side: str) -> Tensor:
    return grad @ basis.T if side == "right" else basis.T @ grad


def project_back(low_rank: Tensor, basis: Tensor, side: str) -> Tensor:
    return low_rank @ basis if side == "right" else basis @ low_rank


def galore_state_bytes(shape: tuple[int, int], rank: int, element_bytes: int = 4) -> int:
    """The optimizer-state bytes GaLore holds for one ``m x n`` matrix: two ``rank x max(m, n)`` moments and
    one ``min(m, n) x rank`` projection (the paper's count; AdamW holds ``2 m n``)."""
    m, n = shape
    return element_bytes * (2 * rank * max(m, n) + min(m, n) * rank)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's low-rank gradient projection for the parameter groups that name a ``rank``.

    Args:
        params: parameters or parameter groups. A group with ``rank`` (and optionally ``update_proj_gap``,
            ``scale``, ``proj_type``) projects its 2-D parameters' gradients; other parameters get AdamW.
        lr: learning rate.
        betas: Adam's moment decays.
        eps: added to ``sqrt(v)`` (before the bias correction, as transformers' and galore-torch's AdamW).
        weight_decay: decoupled weight decay (the weight shrinks by ``lr * weight_decay`` each step).
        per_layer: update each parameter in its gradient hook and free the gradient (module docstring).

    Group keys (galore-torch's): ``rank`` (projection rank, at most ``min(m, n)`` of every matrix in the
    group), ``update_proj_gap`` (steps between projection refreshes, default 200), ``scale`` (multiplies
    the projected-back step, default 0.25), ``proj_type`` (``"std"``: the smaller side of the matrix, the
    default; ``"reverse_std"``, ``"left"``, ``"right"``); weightkit's ``basis``: ``"svd"`` (GaLore, the
    default) or ``"dct"`` (SVD-free), and Q-GaLore's ``proj_bits``, ``cos_threshold``, ``queue_size``
    (module docstring).

    Raises:
        WeightkitError: a bad hyperparameter, a ``rank`` larger than a matrix of its group or below 1, an
            unknown ``proj_type``, or a projected parameter that is not 2-D.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        per_layer: bool = False,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise WeightkitError(
                f"GaLoreAdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, "
                f"weight_decay={weight_decay}, betas={betas}"
            )
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "rank" in group:
                _check_projected_group(group)
        self.per_layer = per_layer
        self._hooks = []
        if per_layer:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(group)))

    def _hook(self, group: dict):
        def update(p: Tensor) -> None:
            with torch.no_grad():
                self._update(p, group)
            p.grad = None

        return update

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW/GaLore step for every parameter with a gradient (with ``per_layer``, they were updated
        in their gradient hooks already: this only runs ``closure``)."""
        loss = closure_loss(closure)
        if self.per_layer:
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype; Q-GaLore's codes and the DCT indices
        # are integers and must stay so.
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key, value in saved.items():
                if torch.is_tensor(value) and not value.is_floating_point():
                    self.state[params[index]][key] = value.to(params[index].device)

    def _update(self, p: Tensor, group: dict) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise WeightkitError("GaLoreAdamW does not take sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = 0
        projected = "rank" in group
        if projected:
            side = _side(grad.shape, group.get("proj_type", "std"))
            refresh = state["step"] == state.setdefault("next_refresh", 0)
            if refresh:
                state["next_refresh"] = state["step"] + state.setdefault(
                    "gap", group.get("update_proj_gap", 200)
                )
            if group.get("basis", "svd") == "dct":
                if refresh:
                    state["columns"] = dct_columns(grad, group["rank"], side)
                basis = dct_projection(grad, state["columns"], side)
            else:
                if refresh:
                    _store_projection(state, group, projection(grad, group["rank"], side), side)
                length = grad.shape[1] if side == "right" else grad.shape[0]
                basis = _stored_projection(state, group, side, length, grad.dtype)
            grad = project(grad, basis, side)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"]
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        denominator = exp_avg_sq.sqrt().add_(group["eps"])
        if projected:
            # Projected back and added in one matrix product: no full-size temporary.
            low_rank, alpha = exp_avg / denominator, -step_size * group.get("scale", 0.25)
            if side == "right":
                p.addmm_(low_rank, basis, alpha=alpha)
            else:
                p.addmm_(basis, low_rank, alpha=alpha)
        else:
            p.addcdiv_(exp_avg, denominator, value=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def _store_projection(state: dict, group: dict, basis: Tensor, side: str) -> None:
    """Keep a new projection (quantized with ``proj_bits``), and with ``cos_threshold`` lengthen the
    parameter's refresh gap once the projection has stopped moving (Q-GaLore's lazy refresh)."""
    bits = group.get("proj_bits")
    vectors = basis if side == "right" else basis.T  # one basis vector per row
    if group.get("cos_threshold") is not None and ("projection" in state or "projection_codes" in state):
        old = _stored_projection(state, group, side, vectors.shape[1], basis.dtype)
        old_vectors = old if side == "right" else old.T
        similarity = float(torch.nn.functional.cosine_similarity(old_vectors, vectors, dim=1).abs().mean())
        recent = [*state.get("similarities", []), similarity][-group.get("queue_size", 5) :]
        state["similarities"] = recent
        if len(recent) == group.get("queue_size", 5) and sum(recent) / len(recent) >= group["cos_threshold"]:
            state["gap"] *= 2
            state["next_refresh"] = state["step"] + state["gap"]
            state["similarities"] = []
    if bits is None:
        state["projection"] = basis
        return
    codes, scales = quantize_rows(vectors, bits)
    state["projection_codes"], state["projection_scales"] = codes, scales


def _stored_projection(state: dict, group: dict, side: str, length: int, dtype: torch.dtype) -> Tensor:
    """The stored projection (basis vectors of ``length`` values), dequantized when stored quantized."""
    if group.get("proj_bits") is None:
        return state["projection"]
    codes, scales = state["projection_codes"], state["projection_scales"]
    vectors = dequantize_rows(codes, scales, group["proj_bits"], length).to(dtype)
    return vectors if side == "right" else vectors.T


def quantize_rows(matrix: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest codes of each row of ``matrix``, each with its own scale
    (``max |row| / (2^(bits-1) - 1)``): int8 codes, two 4-bit codes per byte for ``bits=4`` (the row
    padded to an even length), and float32 scales."""
    top = 2 ** (bits - 1) - 1
    scales = matrix.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
    codes = torch.round(matrix.float() / scales).clamp(-top, top).to(torch.int8)
    if bits == 4:
        if codes.shape[1] % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        low, high = (codes[:, 0::2] & 0xF).to(torch.uint8), (codes[:, 1::2] & 0xF).to(torch.uint8)
        codes = low | (high << 4)
    return codes, scales


def dequantize_rows(codes: Tensor, scales: Tensor, bits: int, length: int) -> Tensor:
    """The float32 rows (of ``length`` values) that :func:`quantize_rows` encoded."""
    if bits == 4:
        nibbles = torch.stack([codes & 0xF, codes >> 4], dim=2).reshape(codes.shape[0], -1).to(torch.int8)
        codes = torch.where(nibbles > 7, nibbles - 16, nibbles)[:, :length]
    return codes.float() * scales


def _check_projected_group(group: dict) -> None:
    if group.get("proj_bits") not in (None, 8, 4):
        raise WeightkitError(f"GaLoreAdamW: proj_bits must be 8 or 4 (or absent), got {group['proj_bits']!r}")
    if group.get("proj_bits") is not None and group.get("basis", "svd") == "dct":
        raise WeightkitError("GaLoreAdamW: proj_bits quantizes an SVD projection; basis 'dct' stores indices")
    if group.get("basis", "svd") not in ("svd", "dct"):
        raise WeightkitError(f"GaLoreAdamW: unknown basis {group['basis']!r}; expected 'svd' or 'dct'")
    proj_type = group.get("proj_type", "std")
    if proj_type == "full":
        raise WeightkitError("GaLoreAdamW: proj_type 'full' (projection on both sides) is not implemented")
    if proj_type not in _PROJ_TYPES:
        raise WeightkitError(f"GaLoreAdamW: unknown proj_type {proj_type!r}; expected one of {_PROJ_TYPES}")
    rank, gap = group["rank"], group.get("update_proj_gap", 200)
    if not isinstance(rank, int) or rank < 1 or not isinstance(gap, int) or gap < 1:
        raise WeightkitError(
            f"GaLoreAdamW: rank and update_proj_gap must be integers >= 1, got {rank}, {gap}"
        )
    for p in group["params"]:
        if p.dim() != 2:
            raise WeightkitError(
                f"GaLoreAdamW: a group with rank projects matrices; it holds a {p.dim()}-D parameter of "
                f"shape {tuple(p.shape)} (put norms and biases in a group without rank)"
            )
        if rank > min(p.shape):
            raise WeightkitError(
                f"GaLoreAdamW: rank {rank} is larger than a {tuple(p.shape)} matrix of its group allows "
                f"({min(p.shape)})"
            )


def galore_param_groups(model: nn.Module, rank: int, **group_keys) -> list[dict]:
    """GaLore's usual split (the paper's, and galore-torch's examples): the weights of the linear layers in
    the model's repeated blocks (attention and MLP) projected at ``rank`` (``group_keys``:
    ``update_proj_gap``, ``scale``, ``proj_type`` ...), every other trainable parameter (embeddings, norms,
    the output head) plain AdamW.

    Raises:
        WeightkitError: the model has no repeated blocks of linear layers.
    """
    from weightkit.arch import block_lists
    from weightkit.select import LINEAR_TYPES

    matrices = {}  # by id: a weight shared by two layers is one parameter
    for _, blocks in block_lists(model):
        for module in blocks.modules():
            if isinstance(module, LINEAR_TYPES) and module.weight.requires_grad:
                matrices[id(module.weight)] = module.weight
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in matrices]
    groups = [{"params": list(matrices.values()), "rank": rank, **group_keys}] if matrices else []
    return groups + ([{"params": others}] if others else [])
