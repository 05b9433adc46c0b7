"""OLoRA: start LoRA from an orthonormal basis of the weight (QR) and freeze the rest.

Paper: Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv 2406.01775.
With ``W = Q R`` (QR decomposition of the out x in weight), ``B`` starts as the first ``r`` columns of ``Q``
(orthonormal) and ``A`` as the first ``r`` rows of ``R``; the frozen base becomes the residual
``W - scaling * B @ A``, so the model computes the same function at the start. As PiSSA
(:mod:`weightkit.adapt.pissa`), whose saving path it shares (the trained update is saved against the
original base as a LoRA of rank ``2r``).

This follows PEFT's ``olora_init`` (``init_lora_weights="olora"``): the QR in float32, ``R``'s rows taken
without rescaling. The only deviation: the factors stay in float32 and only the residual is rounded to the
weight's dtype (as :func:`weightkit.adapt.pissa.principal_factors` does).
"""

import torch
from torch import Tensor

from weightkit.adapt.pissa import check_residual_init

__all__ = ["orthonormal_factors"]


def orthonormal_factors(weight: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA's initial LoRA factors of ``weight`` and the residual base weight they leave.

    Args:
        weight: an ``nn.Linear`` weight, out x in, float32/float16/bfloat16.
        rank: ``r`` (1 <= r <= min(out, in)).
        scaling: the LoRA scaling the adapter runs with.

    Returns:
        ``(A, B, residual)``: ``A`` (r x in) and ``B`` (out x r) in float32, ``residual`` in ``weight``'s
        dtype, with ``residual + scaling * B @ A == weight`` up to that rounding.

    Raises:
        WeightkitError: a weight that is not a floating-point matrix, or a bad rank.
    """
    check_residual_init(weight, rank, "olora")
    matrix = weight.detach().to(torch.float32)
    Q, R = torch.linalg.qr(matrix)
    B, A = Q[:, :rank].contiguous(), R[:rank].contiguous()
    residual = matrix - scaling * B @ A
    return A, B, residual.to(weight.dtype)
