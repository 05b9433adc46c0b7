"""Small linear-algebra helpers that several verbs share."""

import torch
from torch import Tensor

__all__ = ["largest_entry_signs"]


def largest_entry_signs(vectors: Tensor, dim: int) -> Tensor:
    """The sign (``+1``/``-1``) of the largest-magnitude entry of each vector, vectors along ``dim``.

    Singular vectors are defined up to a sign that LAPACK builds choose differently; multiplying each by
    this sign (and its partner vector too, for an SVD) makes them a function of the matrix alone
    (scikit-learn's and PEFT's ``svd_flip``). A zero vector gets ``+1``.
    """
    largest = vectors.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(vectors.gather(dim, largest)).squeeze(dim)
    return torch.where(signs == 0, 1.0, signs).to(vectors.dtype)
