"""Small linear-algebra helpers that several verbs share: sign fixing of singular vectors, and WeLore's
per-matrix rank rule (read by ``weightkit inspect`` and applied by ``weightkit compress --method welore``).

WeLore's rank rule (:func:`welore_rank`, :func:`welore_label`): Jaiswal et al., "From GaLore to WeLore:
How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients" (arXiv 2407.11239; code
github.com/VITA-Group/WeLore). WeLore reads each matrix's heavy-tailed singular value spectrum to choose how
much rank it can lose, non-uniformly across matrices, with one global threshold. As the reference code
does it (``utils.adaptive_rank_pruning`` and
``lib/rank_reduction.do_rank_reduction``):

1. min-max normalise the singular values: ``s' = (s - min s) / (max s - min s)`` (in [0, 1]);
2. the rank removed is the number of normalised values strictly below the threshold, so the kept rank is
   ``k = r - #{s' < threshold}`` with ``r = min(rows, cols)``, and the *rank reduction ratio* is
   ``#{s' < threshold} / r``. A heavy-tailed (sharply decaying) spectrum has most values near 0 after the
   normalisation and loses most of its rank; a flat one loses little.
3. a matrix is a Low-rank Component (LRC), to be stored as two factors and fine-tuned, when its ratio
   exceeds ``min_ratio``; otherwise a Non-Low-rank Component (N-LRC), kept dense and frozen.

Defaults: the threshold is set per target compression in the reference code
(``rank_thresold_llama7b_dict``: 0.0225 for 10% ... 0.175 for 50% ... 0.26 for 70% of LLaMa-2 7B's total
rank); the default here is its 50% value, 0.175, the setting of the paper's headline results. The LRC
rule's ``min_ratio`` default is the fine-tuning scripts' ``--min_ratio 0.4999`` with a strict ``>``, i.e. a
matrix is LRC when it loses at least half its rank — the point below which factors ``m k + k n`` would not
be smaller than the dense ``m n`` for a square matrix.

One deviation, for a case the reference leaves undefined: when all singular values are equal the
normalisation divides 0 by 0 (NumPy gives NaN and the reference removes nothing); here the ratio is 0
explicitly. The singular values must be all of them: with only the top ones, ``min s`` and ``r`` are wrong.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = [
    "largest_entry_signs",
    "WeLoreRank",
    "welore_rank",
    "welore_label",
    "WELORE_THRESHOLD",
    "WELORE_MIN_RATIO",
    "paired_features",
    "token_cosines",
    "mean_token_cosine",
]


def largest_entry_signs(vectors: Tensor, dim: int) -> Tensor:
    """The sign (``+1``/``-1``) of the largest-magnitude entry of each vector, vectors along ``dim``.

    Singular vectors are defined up to a sign that LAPACK builds choose differently; multiplying each by
    this sign (and its partner vector too, for an SVD) makes them a function of the matrix alone
    (scikit-learn's and PEFT's ``svd_flip``). A zero vector gets ``+1``.
    """
    largest = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(vectors.gather(dim, largest)).squeeze(dim)
    return torch.where(signs == 0, 1.0, signs).to(vectors.dtype)


WELORE_THRESHOLD = 0.175
"""The reference code's normalised-singular-value threshold for a 50% rank reduction of LLaMa-2 7B."""

WELORE_MIN_RATIO = 0.4999
"""The reference fine-tuning scripts' ``--min_ratio``: LRC when the rank reduction ratio exceeds it."""


@dataclass(frozen=True)
class WeLoreRank:
    """WeLore's verdict on one matrix.

    Attributes:
        rank: the kept rank ``k`` (``full_rank`` minus the removed singular values).
        full_rank: ``min(rows, cols)``, the number of singular values.
        ratio: the rank reduction ratio, ``(full_rank - rank) / full_rank``.
    """

    rank: int
    full_rank: int
    ratio: float


def welore_rank(singular_values: Tensor, *, threshold: float = WELORE_THRESHOLD) -> WeLoreRank:
    """WeLore's kept rank and rank reduction ratio for a matrix with these (all of its) ``singular_values``.

    Raises:
        WeightkitError: ``singular_values`` is not a non-empty 1-D tensor of finite values >= 0, or
            ``threshold`` is outside [0, 1].
    """
    if singular_values.dim() != 1 or singular_values.numel() == 0:
        raise WeightkitError(
            f"WeLore takes a 1-D tensor of singular values, got shape {tuple(singular_values.shape)}"
        )
    values = singular_values.detach().to(torch.float64)
    if not torch.isfinite(values).all() or bool((values < 0).any()):
        raise WeightkitError("singular values are finite and >= 0")
    if not 0 <= threshold <= 1:
        raise WeightkitError(f"the WeLore threshold applies to values normalised to [0, 1]; got {threshold}")
    full_rank = values.numel()
    low, high = values.min(), values.max()
    removed = 0 if high == low else int(((values - low) / (high - low) < threshold).sum())
    return WeLoreRank(rank=full_rank - removed, full_rank=full_rank, ratio=removed / full_rank)


def welore_label(ratio: float, *, min_ratio: float = WELORE_MIN_RATIO) -> str:
    """``"LRC"`` (low-rank component) if the rank reduction ``ratio`` exceeds ``min_ratio``, else ``"N-LRC"``.

    The reference's rule with its default: strictly greater, so a ratio of 0.5 is LRC.
    """
    return "LRC" if ratio > min_ratio else "N-LRC"


def paired_features(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and ``y``, two ``n x d`` representations of the same ``n`` examples (tokens), as float64.

    Raises:
        WeightkitError: not two matrices with the same number of rows, or NaN/Inf values.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise WeightkitError(
            f"expected two n x d matrices of the same n examples; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise WeightkitError("the features hold NaN or Inf values")
    return x, y


def token_cosines(x: Tensor, y: Tensor) -> Tensor:
    """The cosine of each row of ``x`` with the same row of ``y`` (both ``n x d``), in float64.

    Raises:
        WeightkitError: as :func:`paired_features`, different widths, or a row that is all zeros (no
            direction).
    """
    x, y = paired_features(x, y)
    if x.shape != y.shape:
        raise WeightkitError(
            f"expected two n x d matrices of one shape; got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    norms = x.norm(dim=1) * y.norm(dim=1)
    if (norms == 0).any():
        raise WeightkitError("a token's vector is all zeros: its cosine similarity is undefined")
    return (x * y).sum(1) / norms


def mean_token_cosine(x: Tensor, y: Tensor) -> float:
    """The mean over rows (tokens) of the cosine similarity of ``x[t]`` and ``y[t]`` (both ``n x d``).

    This is the similarity behind ShortGPT's Block Influence (Men et al., arXiv 2403.03853):
    ``BI_i = 1 - E_t cos(x_{i,t}, x_{i+1,t})`` for a block's input ``x_i`` and output ``x_{i+1}``; both
    ``weightkit.inspect`` (layer similarity) and FoldGPT's block removal (``weightkit.compress``) use it.

    Raises:
        WeightkitError: different shapes, no rows, NaN/Inf, or a row that is all zeros.
    """
    if x.shape[0] == 0:
        raise WeightkitError(f"expected two n x d matrices of one shape, n >= 1; got {tuple(x.shape)}")
    return float(token_cosines(x, y).mean())
