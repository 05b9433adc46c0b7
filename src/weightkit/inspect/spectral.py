"""The spectrum of one weight matrix and the rank measures read from it: pure functions on tensors.

Spectra:

- :func:`singular_values`: all singular values by a full SVD (``torch.linalg.svdvals``), the reference.
- :func:`spectrum`: what :func:`weightkit.inspect.metrics.matrix_metrics` computes once per matrix and reads
  every metric from. Up to ``max_full_rank`` singular values (the smaller side of the matrix) it takes
  the eigenvalues of the Gram matrix of the smaller side (``WᵀW`` or ``WWᵀ``, ``torch.linalg.eigvalsh``),
  in float64 for a float64 weight and in float32 otherwise (the stored precision of real checkpoints).
  Measured on one thread (best of 3; the shapes of a 125M Llama layer: four 768 x 768, two 3072 x 768,
  one 768 x 3072): SciPy's float64 ``svd`` (what weightwatcher runs on a CPU) 1.84 s a layer, torch
  ``svdvals`` float64 3.14 s, Gram + ``eigvalsh`` float64 1.06 s, float32 Gram + float64 ``eigvalsh``
  0.84 s, float32 throughout 0.69 s. Accuracy on the 39 matrices of the bundled MiniLM, alpha against
  weightwatcher 0.7.7's: float64 Gram, median |delta| 1.5e-14 (worst 2.2e-13); float32 Gram with float32
  ``eigvalsh`` 2.9e-6 (worst 7.4e-5); float32 ``svdvals`` 2.9e-6 (worst 1.8e-4). Squaring loses the
  singular values below about ``sqrt(n * eps) * sigma_max`` (``eps`` of the dtype: 1e-8 relative in
  float64, about 7e-3 relative for n = 768 in float32): they come out as that noise floor instead, which
  moves the effective rank of an exactly rank-deficient float32 matrix by a few percent and nothing else
  in the report (the power-law fit ignores eigenvalues under 1e-5 and sits in the upper spectrum).
  Above ``max_full_rank`` it falls back to :func:`randomized_singular_values` for the top
  ``randomized_rank`` values and says so in :attr:`Spectrum.method`.
- :func:`randomized_singular_values`: Halko, Martinsson and Tropp, "Finding structure with randomness:
  probabilistic algorithms for constructing approximate matrix decompositions" (arXiv 0909.4061), Algorithm
  4.4 (randomized range finder with ``q`` power iterations, re-orthonormalised by QR after every product
  against round-off) followed by the SVD of the small ``QᵀA`` (their Algorithm 5.1), with ``p`` oversampling
  columns; by default ``p = k`` and ``q = 4``, chosen by the measurements below (weight spectra decay slowly,
  where the common ``p = 10`` leaves the last values low). Measured relative error of the top ``k`` singular
  values against the full SVD (float64, seed 0): 2048 x 2048 with ``sigma_i = (i + 1)^-0.5``, ``k = 256``:
  worst 8.7e-4, median 1.8e-6; the same size with a Marchenko-Pastur bulk plus a 20-value power-law tail (the
  hardest case, a flat bulk): worst 4.8e-3, median 8.4e-4; 1024 x 512, ``k = 64``: worst 6.5e-4 and 1.0e-2.
  With ``p = 10, q = 2`` the worst errors were 6e-2 to 1.1e-1, with ``p = k, q = 2`` 1.2e-2 to 3.2e-2. The
  tests assert 2e-3 (slow decay) and 2e-2 (bulk) on 1024 x 512, ``k = 64``.

Rank measures (each also on a weight, through :func:`singular_values`):

- stable rank: ``||W||_F^2 / ||W||_2^2``, the sum of the squared singular values over the largest one
  squared (Rudelson and Vershynin's numerical rank; 1 for a rank-one matrix, ``n`` for an orthogonal
  ``n x n`` one, never above the rank).
- effective rank: Roy and Vetterli's, "The effective rank: a measure of effective dimensionality"
  (EUSIPCO 2007): ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` and ``H`` the Shannon entropy
  (natural log; ``0 log 0 = 0``). Between 1 and the rank; equal to ``k`` when ``k`` singular values are
  equal and the rest zero.
- energy rank: the fewest singular values whose squares hold ``fraction`` of ``||W||_F^2`` (the rank a
  truncated SVD needs to keep that share of the energy).

Spectra are computed on the matrix's device and returned in float64. A matrix of zeros has no direction:
every measure refuses it by name rather than return 0/0.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = [
    "Spectrum",
    "spectrum",
    "singular_values",
    "randomized_singular_values",
    "stable_rank",
    "effective_rank",
    "energy_rank",
    "stable_rank_from_singular_values",
    "effective_rank_from_singular_values",
    "energy_rank_from_singular_values",
    "entry_sums",
    "as_tensor",
    "MAX_FULL_RANK",
    "RANDOMIZED_RANK",
]

MAX_FULL_RANK = 8192
"""Largest smaller side decomposed in full (every matrix of models up to 70B). The randomized SVD's
``2 (q + 1)`` passes over a sketch of width ``2k`` cost ``20 k`` multiply-adds per entry against the Gram
matrix's ``min(rows, cols)``, so it only pays off for larger sides; a float32 8192 x 8192 Gram is 256 MB."""

RANDOMIZED_RANK = 256
"""Singular values the randomized SVD computes beyond :data:`MAX_FULL_RANK`: the spectral norm, the outliers,
low energy ranks and the top of the power-law tail."""


def as_tensor(weight) -> Tensor:
    """``weight`` as a tensor: a tensor as it is, a NumPy array or nested list through ``torch.as_tensor``
    (every public function here takes either)."""
    return weight if isinstance(weight, Tensor) else torch.as_tensor(weight)


def _checked_matrix(weight: Tensor) -> Tensor:
    """``weight`` detached, in float32 or float64 (whichever holds its stored precision), after checks."""
    weight = as_tensor(weight)
    if weight.dim() != 2:
        raise WeightkitError(
            f"a weight matrix is 2-D; got shape {tuple(weight.shape)} (a bias, norm scale or conv kernel "
            "has no matrix spectrum)"
        )
    if weight.numel() == 0:
        raise WeightkitError(f"the matrix of shape {tuple(weight.shape)} is empty")
    matrix = weight.detach()
    matrix = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(matrix).all():
        raise WeightkitError("the matrix holds NaN or Inf values: it has no singular values")
    return matrix


_SUM_BLOCK = 1024  # entries reduced in the tensor's dtype before the float64 accumulation


def entry_sums(tensor: Tensor) -> tuple[float, float]:
    """``(sum |w|, sum w^2)`` over the entries of ``tensor``, accumulated in float64.

    Blocks of 1024 entries are reduced in the tensor's dtype (rounding error ~1e-7 relative in float32)
    and the block sums added in float64: as accurate as a float64 copy and ~30x faster on one thread. A
    plain float32 sum of millions of entries is not: ``torch.linalg.vector_norm`` of a 32000 x 768
    float32 matrix is 0.3% off in L2 and 5% off in L1.
    """
    flat = tensor.detach().flatten()
    if not flat.dtype.is_floating_point:
        flat = flat.to(torch.float64)
    whole = flat.numel() - flat.numel() % _SUM_BLOCK
    blocks = [flat[:whole].view(-1, _SUM_BLOCK), flat[whole:].view(1, -1)]
    sum_abs = sum(float(torch.linalg.vector_norm(b, 1, dim=1).double().sum()) for b in blocks)
    sum_sq = sum(float(torch.linalg.vector_norm(b, 2, dim=1).double().square().sum()) for b in blocks)
    return sum_abs, sum_sq


def _refuse_zero(values: Tensor) -> Tensor:
    if values[0] == 0:
        raise WeightkitError("the matrix is all zeros: its rank measures are undefined")
    return values


def singular_values(weight: Tensor) -> Tensor:
    """All singular values of a 2-D ``weight`` by a full SVD, largest first, in float64.

    Raises:
        WeightkitError: ``weight`` is not 2-D, is empty, holds NaN/Inf, or is all zeros.
    """
    return _refuse_zero(torch.linalg.svdvals(_checked_matrix(weight).to(torch.float64)))


def randomized_singular_values(
    weight: Tensor, k: int, *, oversample: int | None = None, power_iterations: int = 4, seed: int = 0
) -> Tensor:
    """The top ``k`` singular values of ``weight`` by Halko, Martinsson and Tropp's randomized SVD.

    Module docstring for the algorithm and its measured accuracy; ``oversample`` defaults to ``k``. Computed
    on ``weight``'s device in its precision (float64 for float64, else float32), returned in float64; the
    Gaussian test matrix is drawn on the CPU from ``seed`` (the same values whatever the device) and moved.

    Raises:
        WeightkitError: ``k`` is not in ``[1, min(weight.shape)]``, or the matrix is refused as by
            :func:`singular_values`.
    """
    matrix = _checked_matrix(weight)
    rows, cols = matrix.shape
    if not 1 <= k <= min(rows, cols):
        raise WeightkitError(f"k must be in [1, {min(rows, cols)}] for a {rows} x {cols} matrix, got {k}")
    oversample = k if oversample is None else oversample
    if oversample < 0 or power_iterations < 0:
        raise WeightkitError("oversample and power_iterations must be >= 0")
    width = min(k + oversample, min(rows, cols))
    generator = torch.Generator().manual_seed(seed)
    test_matrix = torch.randn(cols, width, generator=generator, dtype=torch.float64).to(matrix)
    basis, _ = torch.linalg.qr(matrix @ test_matrix)
    for _ in range(power_iterations):
        # Re-orthonormalise after each product: without it the columns collapse onto the top singular
        # vector in floating point (Halko et al., section 4.5).
        co_basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ co_basis)
    return _refuse_zero(torch.linalg.svdvals(basis.T @ matrix)[:k].to(torch.float64))


@dataclass(frozen=True)
class Spectrum:
    """The singular values of one matrix and what is known exactly besides them.

    Attributes:
        values: singular values, largest first, float64 (all of them, or the top ``k`` when randomized).
        complete: whether ``values`` holds every singular value (``min(shape)`` of them).
        frobenius_sq: ``||W||_F^2``, summed from the entries (exact even when ``values`` is truncated).
        shape: the matrix's shape ``(rows, cols)``.
        method: ``"full"`` or ``"randomized (k=...)"`` — the report's ``svd`` column.
    """

    values: Tensor
    complete: bool
    frobenius_sq: float
    shape: tuple[int, int]
    method: str


def spectrum(
    weight: Tensor, *, max_full_rank: int = MAX_FULL_RANK, randomized_rank: int = RANDOMIZED_RANK
) -> Spectrum:
    """The spectrum of a 2-D ``weight``: all singular values up to ``max_full_rank``, else the top ones.

    Computed on ``weight``'s device in float64 for a float64 weight and in float32 for any other dtype
    (the precision of the stored weights; see the module docstring for what it costs in accuracy).

    Raises:
        WeightkitError: as :func:`singular_values`.
    """
    matrix = _checked_matrix(weight)
    frobenius_sq = entry_sums(matrix)[1]
    if frobenius_sq == 0:
        raise WeightkitError("the matrix is all zeros: its rank measures are undefined")
    shape = (matrix.shape[0], matrix.shape[1])
    rank = min(shape)
    if rank > max_full_rank:
        k = min(randomized_rank, rank)
        values = randomized_singular_values(matrix, k)
        return Spectrum(values, k == rank, frobenius_sq, shape, f"randomized (k={k})")
    gram = matrix.T @ matrix if shape[0] >= shape[1] else matrix @ matrix.T
    # eigvalsh returns ascending values; round-off can make the zero ones slightly negative.
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).to(torch.float64)
    return Spectrum(eigenvalues.sqrt(), True, frobenius_sq, shape, "full")


def stable_rank_from_singular_values(values: Tensor, frobenius_sq: float | None = None) -> float:
    """``||W||_F^2 / sigma_max^2`` from singular values, largest first (``frobenius_sq`` if truncated)."""
    total = float(values.square().sum()) if frobenius_sq is None else frobenius_sq
    return total / float(values[0].square())


def effective_rank_from_singular_values(values: Tensor) -> float:
    """Roy and Vetterli's effective rank from all singular values."""
    p = values / values.sum()
    p = p[p > 0]  # 0 log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank_from_singular_values(
    values: Tensor, fraction: float, frobenius_sq: float | None = None
) -> int | None:
    """The fewest leading singular values whose squares hold ``fraction`` of ``||W||_F^2``.

    With a truncated spectrum, pass the exact ``frobenius_sq``: the answer is then ``None`` when the values
    given do not reach the fraction (the rank lies beyond them and is unknown).

    Raises:
        WeightkitError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise WeightkitError(f"fraction must be in (0, 1], got {fraction}")
    energy = values.square()
    total = float(energy.sum()) if frobenius_sq is None else frobenius_sq
    kept = energy.cumsum(0) / total
    # The first index reaching the fraction; a hair of tolerance so fraction 1 is reached despite rounding.
    below = int((kept < fraction - 1e-12).sum())
    return None if below == len(values) else below + 1


def stable_rank(weight: Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2`` (module docstring)."""
    return stable_rank_from_singular_values(singular_values(weight))


def effective_rank(weight: Tensor) -> float:
    """Roy and Vetterli's effective rank, ``exp`` of the entropy of the normalised singular values."""
    return effective_rank_from_singular_values(singular_values(weight))


def energy_rank(weight: Tensor, fraction: float) -> int:
    """The fewest singular values whose squares hold ``fraction`` (in (0, 1]) of the squared Frobenius norm.

    Raises:
        WeightkitError: ``fraction`` outside (0, 1].
    """
    rank = energy_rank_from_singular_values(singular_values(weight), fraction)
    assert rank is not None  # the full spectrum always reaches any fraction <= 1
    return rank
