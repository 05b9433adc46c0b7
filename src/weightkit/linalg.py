"""Small linear-algebra helpers that several verbs share."""

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["largest_entry_signs", "paired_features", "token_cosines", "mean_token_cosine"]


def largest_entry_signs(vectors: Tensor, dim: int) -> Tensor:
    """The sign (``+1``/``-1``) of the largest-magnitude entry of each vector, vectors along ``dim``.

    Singular vectors are defined up to a sign that LAPACK builds choose differently; multiplying each by
    this sign (and its partner vector too, for an SVD) makes them a function of the matrix alone
    (scikit-learn's and PEFT's ``svd_flip``). A zero vector gets ``+1``.
    """
    largest = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(vectors.gather(dim, largest)).squeeze(dim)
    return torch.where(signs == 0, 1.0, signs).to(vectors.dtype)


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
