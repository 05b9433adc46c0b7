"""Rank measures of one weight matrix, from its singular values: pure functions on tensors.

- :func:`stable_rank`: ``||W||_F^2 / ||W||_2^2``, the sum of the squared singular values over the largest
  one squared (Rudelson and Vershynin's numerical rank; 1 for a rank-one matrix, ``n`` for an orthogonal
  ``n x n`` one, never above the rank).
- :func:`effective_rank`: Roy and Vetterli's, "The effective rank: a measure of effective dimensionality"
  (EUSIPCO 2007): ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` and ``H`` the Shannon entropy
  (natural log; ``0 log 0 = 0``). Between 1 and the rank; equal to ``k`` when ``k`` singular values are
  equal and the rest zero.
- :func:`energy_rank`: the fewest singular values whose squares hold ``fraction`` of ``||W||_F^2``
  (the rank a truncated SVD needs to keep that share of the energy).

Singular values are computed in float64 on the matrix's device (:func:`singular_values`). A matrix of
zeros has no direction: every measure refuses it by name rather than return 0/0.
"""

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["singular_values", "stable_rank", "effective_rank", "energy_rank"]


def singular_values(weight: Tensor) -> Tensor:
    """The singular values of a 2-D ``weight``, largest first, in float64.

    Raises:
        WeightkitError: ``weight`` is not 2-D, holds NaN/Inf, or is all zeros.
    """
    if weight.dim() != 2:
        raise WeightkitError(f"a weight matrix is 2-D; got shape {tuple(weight.shape)}")
    matrix = weight.detach().to(torch.float64)
    if not torch.isfinite(matrix).all():
        raise WeightkitError("the matrix holds NaN or Inf values: it has no singular values")
    values = torch.linalg.svdvals(matrix)
    if values[0] == 0:
        raise WeightkitError("the matrix is all zeros: its rank measures are undefined")
    return values


def stable_rank(weight: Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2`` (module docstring)."""
    values = singular_values(weight)
    return float(values.square().sum() / values[0].square())


def effective_rank(weight: Tensor) -> float:
    """Roy and Vetterli's effective rank, ``exp`` of the entropy of the normalised singular values."""
    values = singular_values(weight)
    p = values / values.sum()
    p = p[p > 0]  # 0 log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(weight: Tensor, fraction: float) -> int:
    """The fewest singular values whose squares hold ``fraction`` (in (0, 1]) of the squared Frobenius norm.

    Raises:
        WeightkitError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise WeightkitError(f"fraction must be in (0, 1], got {fraction}")
    energy = singular_values(weight).square()
    kept = energy.cumsum(0) / energy.sum()
    # The first index reaching the fraction; a hair of tolerance so fraction 1 is reached despite rounding.
    return int((kept < fraction - 1e-12).sum()) + 1
