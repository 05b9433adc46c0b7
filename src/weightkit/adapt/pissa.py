"""PiSSA: start LoRA from the weight's principal components and freeze the rest.

Paper: Meng, Wang and Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models", arXiv 2404.02948. A LoRA adapter ``W_res + scaling * B @ A`` whose ``A`` and ``B`` start
as the top-r singular triplets of ``W`` (split evenly as ``sqrt`` of the singular values on each side) and
whose frozen base is the residual ``W_res = W - scaling * B @ A``: the model computes the same function at
the start, but training moves the principal components instead of a zero update.

Pure functions only; :mod:`weightkit.adapt.lora` wires them in. They follow PEFT's ``pissa_init``
(``peft/tuners/lora/layer.py``) step for step, so an adapter initialised here equals PEFT's
``init_lora_weights="pissa"`` (full SVD) and ``"pissa_niter_<k>"`` (``torch.svd_lowrank`` with ``k``
subspace iterations, PEFT's fast SVD) on the same weight: the singular values are divided by ``scaling``
before the square root, so ``scaling * B @ A`` is the rank-r truncation itself.

Deviations from PEFT: the fast SVD draws its random test matrix from ``seed`` (PEFT draws from the global
torch RNG, whatever its state), so the same inputs give the same factors. The factors are returned in
float32 and only the residual is rounded to the weight's dtype, so on a 16-bit weight kept with float32
factors (the default adapter precision) ``residual + scaling * B @ A`` is the weight up to the residual's
rounding alone (PEFT rounds the factors to the weight's dtype before its autocast upcasts them).
"""

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["check_residual_init", "principal_factors", "pissa_to_lora"]


def check_residual_init(weight: Tensor, rank: int, method: str) -> None:
    """Refuse what an initialisation that splits ``weight`` into factors and a residual cannot take: a
    weight that is not a float32/float16/bfloat16 matrix, or a rank outside ``[1, min(out, in)]``."""
    if weight.ndim != 2 or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise WeightkitError(
            f"{method}: needs a float32/float16/bfloat16 matrix, got a {weight.dtype} tensor of shape "
            f"{tuple(weight.shape)} (dequantize first; quantize the residual afterwards)"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        raise WeightkitError(f"{method}: rank must be an integer in [1, {min(weight.shape)}], got {rank!r}")


def principal_factors(
    weight: Tensor, rank: int, scaling: float, *, niter: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA's initial LoRA factors of ``weight`` and the residual base weight they leave.

    With ``weight = U S V^T`` (out x in) and its top ``rank`` triplets ``U_r, S_r, V_r``:
    ``A = diag(sqrt(S_r / scaling)) V_r^T``, ``B = U_r diag(sqrt(S_r / scaling))`` and
    ``residual = weight - scaling * B @ A``, so ``residual + scaling * B @ A == weight``.

    Args:
        weight: an ``nn.Linear`` weight, out x in, float32/float16/bfloat16, on any device.
        rank: ``r`` (1 <= r <= min(out, in)).
        scaling: the LoRA scaling the adapter runs with (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        niter: ``None`` for the exact SVD (PEFT's ``"pissa"``); an integer ``k >= 0`` for the randomised
            SVD with ``k`` subspace iterations (PEFT's ``"pissa_niter_<k>"``), much faster on large weights.
        seed: seeds the randomised SVD's test matrix (unused with the exact SVD); the global RNG is untouched.

    Returns:
        ``(A, B, residual)``: ``A`` is r x in and ``B`` is out x r in float32, ``residual`` is out x in in
        ``weight``'s dtype; all on ``weight``'s device (computed in float32).

    Raises:
        WeightkitError: a weight that is not a floating-point matrix, or a bad rank, scaling or niter.
    """
    check_residual_init(weight, rank, "pissa")
    if not scaling > 0:
        raise WeightkitError(f"pissa: scaling must be > 0, got {scaling}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise WeightkitError(f"pissa: niter must be None (exact SVD) or an integer >= 0, got {niter!r}")

    matrix = weight.detach().to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        U_r, S_r, Vh_r = U[:, :rank], S[:rank], Vh[:rank]
    else:
        device = matrix.device
        # svd_lowrank draws from the global RNG: fork it so the result depends on `seed` alone.
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            torch.manual_seed(seed)
            U_r, S_r, V_r = torch.svd_lowrank(matrix, q=rank, niter=niter)
        Vh_r = V_r.T
    root = torch.sqrt(S_r / scaling)
    A = root[:, None] * Vh_r
    B = U_r * root
    # (scaling * B) @ A, in PEFT's order of operations, so the residual matches PEFT's bit for bit.
    residual = matrix - (scaling * B) @ A
    return A, B, residual.to(weight.dtype)


def pissa_to_lora(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """A trained PiSSA adapter as a plain LoRA adapter on the *original* weight (rank ``2r``).

    PiSSA trains ``(A, B)`` from ``(A0, B0)`` on the residual base ``W - s * B0 @ A0``, so the fine-tuned
    weight is ``W + s * (B @ A - B0 @ A0)``; that update is the rank-2r product
    ``[B | -B0] @ [A ; A0]``. Run the result with the same scaling ``s``: double ``r`` and ``alpha``
    (with rsLoRA multiply ``alpha`` by ``sqrt(2)``), as PEFT does when saving with
    ``path_initial_model_for_weight_conversion``.

    Args:
        A, B: the trained factors (r x in, out x r).
        A0, B0: the factors PiSSA started from (same shapes).

    Returns:
        ``(A', B')``: ``A'`` is 2r x in, ``B'`` is out x 2r, with ``B' @ A' == B @ A - B0 @ A0``.

    Raises:
        WeightkitError: factors whose shapes do not fit together.
    """
    if A.shape != A0.shape or B.shape != B0.shape or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise WeightkitError(
            f"pissa: cannot convert factors of shapes A {tuple(A.shape)}, B {tuple(B.shape)}, "
            f"A0 {tuple(A0.shape)}, B0 {tuple(B0.shape)}; A and A0 must be r x in, B and B0 out x r"
        )
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)
