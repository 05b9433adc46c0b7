"""WeLore: low-rank components (LRCs) stored as factor pairs, the rest (N-LRCs) kept dense.

Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients"
(arXiv 2407.11239; code github.com/VITA-Group/WeLore). Each selected matrix's rank comes from its own
singular-value spectrum under one global threshold (:func:`~weightkit.linalg.welore_rank`: min-max normalise
the values, drop those below the threshold); a matrix that loses more than ``min_ratio`` of its rank is an
LRC and is replaced by the two factors of its truncated SVD (``U sqrt(S)`` and ``sqrt(S) V^T``, as the
reference's ``LowRankLayer``); the others, N-LRCs, stay dense and untouched (the reference's
``do_rank_reduction``). The LRCs are what ``weightkit adapt --method lrc`` fine-tunes.

The threshold is given, or solved from a target ``rank_reduction`` (:func:`welore_threshold`): the reference
picks the threshold per target from a table measured on LLaMA-2 7B (``rank_thresold_llama7b_dict``, e.g.
0.175 for 50%), which does not carry over to other models; here the threshold is the smallest normalised
singular value of the selected matrices at which the rank removed from the LRCs reaches the target share of
their total rank, the quantity the reference reports as its reduction ratio.

Deviations: the factors are stored in the model's dtype (the reference casts them to bfloat16); the default
``min_ratio`` is the fine-tuning scripts' 0.4999 (the reference's rank-reduction script uses 0, factoring
every matrix that loses any rank, even when its factors are larger than the matrix): pass ``min_ratio=0``
for that.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.compress.lowrank.factor import factor_linears
from weightkit.errors import WeightkitError
from weightkit.linalg import WELORE_MIN_RATIO, WELORE_THRESHOLD, welore_label, welore_rank
from weightkit.registry import register
from weightkit.select import DEFAULT_IGNORE

__all__ = ["WeLoreConfig", "welore_ranks", "welore_threshold"]


def welore_ranks(spectra: Sequence[Tensor], *, threshold: float, min_ratio: float) -> list[int]:
    """Each matrix's WeLore rank: the kept rank of an LRC, the full rank ``min(m, n)`` of an N-LRC (dense).

    Args:
        spectra: each matrix's singular values, all of them.
        threshold: the normalised-singular-value threshold.
        min_ratio: an LRC loses more than this share of its rank.
    """
    ranks = []
    for values in spectra:
        verdict = welore_rank(values, threshold=threshold)
        lrc = welore_label(verdict.ratio, min_ratio=min_ratio) == "LRC"
        ranks.append(verdict.rank if lrc else verdict.full_rank)
    return ranks


def _reduction(spectra: Sequence[Tensor], threshold: float, min_ratio: float) -> float:
    """The share of the matrices' total rank that the LRCs lose at ``threshold``."""
    ranks = welore_ranks(spectra, threshold=threshold, min_ratio=min_ratio)
    full = sum(v.numel() for v in spectra)
    return (full - sum(ranks)) / full


def welore_threshold(spectra: Sequence[Tensor], rank_reduction: float, *, min_ratio: float) -> float:
    """The smallest threshold at which the LRCs lose at least ``rank_reduction`` of the matrices' total rank.

    The reduction only changes where the threshold passes a normalised singular value (values strictly
    below it are removed), and it never falls as the threshold rises (a matrix loses more rank, and an LRC
    stays one), so the answer is one of the normalised values (or 1), found by bisection over them.

    Raises:
        WeightkitError: even the threshold 1 (every matrix keeps only its largest values) does not reach it.
    """
    normalised = []
    for values in spectra:
        values = values.detach().to(torch.float64)
        low, high = values.min(), values.max()
        if high > low:  # a flat spectrum loses nothing at any threshold
            normalised.append((values - low) / (high - low))
    candidates = torch.unique(torch.cat([*normalised, torch.ones(1, dtype=torch.float64)]))
    candidates = candidates[candidates > 0].tolist()  # at 0 nothing is removed
    reachable = _reduction(spectra, candidates[-1], min_ratio)
    if reachable < rank_reduction:
        raise WeightkitError(
            f"a rank reduction of {rank_reduction:g} is out of reach: at threshold 1, where every matrix "
            f"keeps only its largest singular values, WeLore removes {reachable:.4f} of the selected "
            f"matrices' rank (with min_ratio {min_ratio:g})"
        )
    low, high = 0, len(candidates) - 1  # the answer is candidates[high]; candidates[low - 1] falls short
    while low < high:
        middle = (low + high) // 2
        if _reduction(spectra, candidates[middle], min_ratio) >= rank_reduction:
            high = middle
        else:
            low = middle + 1
    return candidates[high]


@dataclass
class WeLoreConfig:
    """WeLore (module docstring): LRCs factored at their spectrum's rank, N-LRCs kept dense.

    Attributes:
        threshold: normalised singular values (``(s - min s) / (max s - min s)``, in [0, 1]) below it are
            dropped, per matrix, with this one threshold for all; higher removes more. Default: 0.175, the
            reference's setting for a 50% rank reduction of LLaMA-2 7B. Give this or ``rank_reduction``.
        rank_reduction: instead of ``threshold``, the share of the selected matrices' total rank to remove,
            in (0, 1): the threshold is solved for it.
        min_ratio: a matrix is an LRC (factored) when it loses more than this share of its rank, in
            [0, 1); below 0.5 an LRC's factors may be larger than the matrix (default 0.4999, the
            reference's fine-tuning setting: an LRC loses at least half its rank).
        targets: module names or ``re:`` patterns to consider; ``_default`` means every linear layer.
        ignore: names or patterns left dense (default: embeddings, lm_head, norms, pooler).
    """

    LABEL: ClassVar[str] = "WeLore"

    threshold: float | None = None
    rank_reduction: float | None = None
    min_ratio: float = WELORE_MIN_RATIO
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    def __post_init__(self):
        if self.threshold is not None and self.rank_reduction is not None:
            raise WeightkitError(
                "give WeLore a threshold or a rank_reduction to solve the threshold for, not both"
            )
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise WeightkitError(
                f"threshold applies to singular values normalised to [0, 1]; got {self.threshold}"
            )
        if self.rank_reduction is not None and not 0 < self.rank_reduction < 1:
            raise WeightkitError(
                f"rank_reduction is the share of the total rank removed, in (0, 1); got {self.rank_reduction}"
            )
        if not 0 <= self.min_ratio < 1:
            raise WeightkitError(f"min_ratio is a share of a matrix's rank, in [0, 1); got {self.min_ratio}")

    def ranks(self, spectra: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        """Each selected matrix's rank: an LRC's kept rank, ``min(m, n)`` for an N-LRC.

        Raises:
            WeightkitError: an unreachable ``rank_reduction``, or no matrix is an LRC.
        """
        names = list(spectra)
        values = [spectra[name] for name in names]
        if self.rank_reduction is not None:
            threshold = welore_threshold(values, self.rank_reduction, min_ratio=self.min_ratio)
        else:
            threshold = WELORE_THRESHOLD if self.threshold is None else self.threshold
        ranks = welore_ranks(values, threshold=threshold, min_ratio=self.min_ratio)
        if all(rank == min(shapes[name]) for name, rank in zip(names, ranks, strict=True)):
            raise WeightkitError(
                f"at threshold {threshold:g} no selected matrix loses more than min_ratio {self.min_ratio:g} "
                "of its rank, so none is a low-rank component and nothing would be compressed; raise the "
                "threshold (or rank_reduction) or lower min_ratio"
            )
        return dict(zip(names, ranks, strict=True))


register("compress", "welore", WeLoreConfig, factor_linears)
