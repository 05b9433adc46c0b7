"""Truncated SVD with one global parameter budget: each selected linear weight ``W`` (``m x n``) becomes the
factors of its best rank-``k`` approximation (Eckart-Young), ``k`` chosen per matrix so that the selected
layers together keep ``ratio`` of their parameters.

The baseline of the low-rank compression literature (e.g. the plain-SVD rows of "ASVD" arXiv 2312.05821 and
"SVD-LLM" arXiv 2403.07378); it uses no data. The ranks are not one for all: the budget goes where the
singular values say it buys the most, by this rule (:func:`allocate_ranks`):

1. every singular component ``i`` of matrix ``j`` (value ``s_ij``) is worth its share of its matrix's energy,
   ``s_ij^2 / sum_i s_ij^2`` (the fraction of ``||W_j||_F^2`` it restores), per parameter it costs as a
   factor pair, ``m_j + n_j``;
2. every matrix first gets rank 1 (a layer at rank 0 would be deleted, not compressed);
3. then components are taken in order of decreasing worth (ties: model order, then component order) while
   the running total of parameters stays within the budget ``floor(ratio * sum_j m_j n_j)``; the first
   component that would exceed it ends the allocation. A matrix's worths decrease with ``i``, so each
   matrix gets a prefix of its components: a rank;
4. a matrix costs ``min(k (m + n), m n)``: once ``k (m + n) >= m n`` the factors are no smaller than the
   weight, so it stays dense (rank ``min(m, n)``, exact), and the components that made it dense cost only
   what is left up to ``m n``. So at ``ratio = 1`` every matrix stays dense.

The parameters kept, ``sum_j min(k_j (m_j + n_j), m_j n_j)``, are at most the budget (tested exactly).
Biases, embeddings and unselected layers are not counted.

Refused (one message, nothing written): ``ratio`` outside (0, 1]; a ratio below what rank 1 in every
selected layer costs (the minimum is named); a ratio at which every selected layer stays dense (nothing to
compress: lower the ratio).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.compress.lowrank.factor import factor_linears
from weightkit.errors import WeightkitError
from weightkit.registry import register
from weightkit.select import DEFAULT_IGNORE

__all__ = ["SVDConfig", "allocate_ranks", "kept_parameters"]


def _cost(rank: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Parameters of a matrix at ``rank``: the factor pair's, or the dense matrix's once that is smaller."""
    return torch.minimum(rank * (rows + cols), rows * cols)


def kept_parameters(ranks: Sequence[int], shapes: Sequence[tuple[int, int]]) -> int:
    """Parameters the matrices of ``shapes`` keep at ``ranks``: ``k (m + n)`` for a factored one, ``m n`` for
    one kept dense (``k = min(m, n)``)."""
    return sum(m * n if k >= min(m, n) else k * (m + n) for k, (m, n) in zip(ranks, shapes, strict=True))


def allocate_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: int) -> list[int]:
    """The rank of each matrix under one parameter ``budget``, by singular-value energy (module docstring).

    Args:
        spectra: each matrix's singular values, all ``min(m, n)`` of them, descending.
        shapes: each matrix's ``(m, n)``.
        budget: parameters the matrices may keep together.

    Returns:
        Each matrix's rank; ``min(m, n)`` means kept dense (its factors would not be smaller).

    Raises:
        WeightkitError: a spectrum that is not the ``min(m, n)`` descending values of its shape, or a budget
            below what rank 1 for every matrix costs.
    """
    for values, (m, n) in zip(spectra, shapes, strict=True):
        if values.dim() != 1 or values.numel() != min(m, n) or bool((values[1:] > values[:-1]).any()):
            raise WeightkitError(
                f"a spectrum of a {m}x{n} matrix is its {min(m, n)} singular values, descending; got "
                f"{tuple(values.shape)} values"
            )
    sizes = torch.tensor([v.numel() for v in spectra])
    matrix = torch.repeat_interleave(torch.arange(len(spectra)), sizes)
    rows, cols = (torch.tensor(dim, dtype=torch.int64)[matrix] for dim in zip(*shapes, strict=True))
    # The rank a matrix reaches when this component is taken (prefixes: components come in order).
    reached = torch.cat([torch.arange(1, k + 1) for k in sizes.tolist()])
    energy = torch.cat([v.to(torch.float64) ** 2 for v in spectra])
    total = torch.zeros(len(spectra), dtype=torch.float64).index_add_(0, matrix, energy)[matrix]
    share = torch.where(total > 0, energy / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    worth = torch.where(reached == 1, torch.inf, share / (rows + cols))
    marginal = _cost(reached, rows, cols) - _cost(reached - 1, rows, cols)
    minimum = int(marginal[reached == 1].sum())
    if budget < minimum:
        raise WeightkitError(
            f"a budget of {budget} parameters is below the {minimum} that rank 1 in every matrix costs"
        )
    order = torch.sort(-worth, stable=True).indices
    taken = order[torch.cumsum(marginal[order], 0) <= budget]
    ranks = torch.bincount(matrix[taken], minlength=len(spectra))
    full = torch.tensor([min(m, n) for m, n in shapes])
    dense = ranks * torch.tensor([m + n for m, n in shapes]) >= torch.tensor([m * n for m, n in shapes])
    return torch.where(dense, full, ranks).tolist()


@dataclass
class SVDConfig:
    """Truncated SVD of the linear layers under one global parameter budget (module docstring).

    Attributes:
        ratio: the fraction of the selected layers' weight parameters kept, in (0, 1]: 0.5 stores the
            selected weights in half their parameters. Ranks are allocated across layers by singular-value
            energy; a layer whose allocated factors would not be smaller than it stays dense.
        targets: module names or ``re:`` patterns to factor; ``_default`` means every linear layer.
        ignore: names or patterns left dense (default: embeddings, lm_head, norms, pooler).
    """

    LABEL: ClassVar[str] = "SVD"

    ratio: float = 0.5
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise WeightkitError(
                f"ratio is the fraction of the selected layers' parameters kept, in (0, 1]; got {self.ratio}"
            )

    def ranks(self, spectra: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        """Each selected layer's rank (``min(m, n)``: kept dense) under the budget ``ratio`` sets.

        Raises:
            WeightkitError: ``ratio`` below the minimum (rank 1 everywhere), or so high that every layer
                stays dense.
        """
        names = list(spectra)
        dims = [shapes[name] for name in names]
        total = sum(m * n for m, n in dims)
        minimum = sum(min(m + n, m * n) for m, n in dims)
        budget = int(self.ratio * total)
        if budget < minimum:
            raise WeightkitError(
                f"ratio {self.ratio:g} keeps {budget} of the {total} parameters of the {len(names)} selected "
                f"layers, fewer than the {minimum} that rank 1 in each of them costs: the smallest ratio is "
                f"{minimum / total:.6f}"
            )
        ranks = dict(zip(names, allocate_ranks([spectra[n] for n in names], dims, budget), strict=True))
        if all(ranks[name] >= min(shapes[name]) for name in names):
            raise WeightkitError(
                f"ratio {self.ratio:g} leaves every selected layer dense: a rank-k factor pair of an m x n "
                "weight is smaller only when k (m + n) < m n, and this budget lets each layer keep at least "
                "that rank, so nothing would be compressed; lower the ratio"
            )
        return ranks


register("compress", "svd", SVDConfig, factor_linears)
