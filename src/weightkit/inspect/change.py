"""What changed from a base checkpoint to another one of the same model (a fine-tune), tensor by tensor.

Pure functions first (tensors in, numbers out), then :func:`compare_checkpoints`, which streams one tensor
at a time from each checkpoint with :class:`weightkit.checkpoint.CheckpointReader`. For base ``A`` and
other ``B`` (``Δ = B - A``): :func:`relative_change` ``||Δ||_F / ||A||_F``, :func:`cosine` between ``A``
and ``B``, :func:`sign_agreement` (share of entries with equal sign), and for matrices the rank measures of
``Δ`` (:mod:`weightkit.inspect.spectral`) and its top singular values (:func:`delta_spectrum`).

Tensors are paired by their name in the checkpoint only. A name present on one side only, a shape that
differs, or a tensor that is not floating-point becomes a row whose ``status`` says so; nothing is paired
by position or guessed. Each tensor is compared in float64 (exact sums on any checkpoint dtype); peak memory
is a few float64 copies of the largest tensor.

:class:`Table` is the result type of every comparison of :mod:`weightkit.inspect.compare`.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader
from weightkit.inspect.spectral import effective_rank, energy_rank, singular_values, stable_rank
from weightkit.quantized.compressed_tensors import refuse_quantized

__all__ = [
    "Table",
    "TOP_SINGULAR_VALUES",
    "relative_change",
    "cosine",
    "sign_agreement",
    "square_factor",
    "delta_spectrum",
    "compare_checkpoints",
]

TOP_SINGULAR_VALUES = 32  # how many singular values of a difference a row keeps, for the plot
# How a comparison of full-precision checkpoints refuses a quantized one (refuse_quantized's "instead").
FULL_PRECISION_ONLY = (
    "compare a quantized checkpoint with the full-precision model it was made from (weightkit.inspect."
    "compare.compare does, with quantization_error)"
)


@dataclass
class Table:
    """A comparison's result: ``rows`` (one dict per tensor, all with the same keys, ``name`` first) and
    ``summary`` (model-level numbers). Each function documents its keys; ``None`` means not applicable."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


# -- pure functions ------------------------------------------------------------------------------------


def relative_change(base: Tensor, other: Tensor) -> float | None:
    """``||other - base||_F / ||base||_F``; None when ``base`` is all zeros (no scale to be relative to)."""
    base_norm = torch.linalg.vector_norm(base.double())
    if base_norm == 0:
        return None
    return float(torch.linalg.vector_norm(other.double() - base.double()) / base_norm)


def cosine(a: Tensor, b: Tensor) -> float | None:
    """Cosine of the angle between ``a`` and ``b`` flattened; None when either is all zeros."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    norms = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    return None if norms == 0 else float(a @ b / norms)


def sign_agreement(a: Tensor, b: Tensor) -> float:
    """Share of entries where ``sign(a) == sign(b)`` (-1, 0 or +1, so a zero agrees only with a zero)."""
    return float((torch.sign(a) == torch.sign(b)).double().mean())


def delta_spectrum(delta: Tensor) -> dict:
    """Rank measures of a nonzero 2-D difference: ``delta_stable_rank``, ``delta_effective_rank``,
    ``delta_rank_90`` (singular values keeping 90% of ``||Δ||_F^2``) and ``delta_singular_values`` (the
    largest :data:`TOP_SINGULAR_VALUES`, largest first, a list of floats)."""
    square = square_factor(delta)
    return {
        "delta_stable_rank": stable_rank(square),
        "delta_effective_rank": effective_rank(square),
        "delta_rank_90": energy_rank(square, 0.90),
        "delta_singular_values": singular_values(square)[:TOP_SINGULAR_VALUES].tolist(),
    }


def square_factor(matrix: Tensor) -> Tensor:
    """A ``k x k`` matrix (``k`` the smaller dimension) with the singular values of ``matrix``: the ``R`` of
    the thin QR factorization of ``matrix`` (or of its transpose when it is wide), in float64.

    ``M = Q R`` with orthonormal columns in ``Q``, so ``M`` and ``R`` have the same singular values, and
    the rank measures of :mod:`weightkit.inspect.spectral` (one SVD each) then cost ``O(k^3)`` instead of
    ``O(m k^2)``: for MiniLM's 30522 x 384 embedding, the QR takes a fraction of one full SVD's time.
    """
    matrix = matrix.double()
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    return torch.linalg.qr(matrix, mode="r").R


# -- streaming ----------------------------------------------------------------------------------------


def unpaired_reason(name: str, readers: dict[str, CheckpointReader], base: CheckpointReader) -> str | None:
    """Why tensor ``name`` of ``base`` cannot be compared with the same name in ``readers``, or None."""
    if not base.dtype(name).is_floating_point:
        return f"not a floating-point tensor ({base.dtype(name)})"
    for label, reader in readers.items():
        if name not in reader:
            tied = (reader.config or {}).get("tie_word_embeddings")
            note = (
                "; its config ties word embeddings, so this may be stored once under another name"
                if tied
                else ""
            )
            return f"absent in {label}{note}"
        if reader.shape(name) != base.shape(name):
            return f"shape {tuple(base.shape(name))} in base but {tuple(reader.shape(name))} in {label}"
        if not reader.dtype(name).is_floating_point:
            return f"not a floating-point tensor in {label} ({reader.dtype(name)})"
    return None


def names_absent_from_base(
    base: CheckpointReader, readers: dict[str, CheckpointReader]
) -> dict[str, list[str]]:
    """The tensors the compared checkpoints have and the base lacks: name -> labels of those that have it."""
    absent: dict[str, list[str]] = {}
    for label, reader in readers.items():
        for name in reader.names():
            if name not in base:
                absent.setdefault(name, []).append(label)
    return absent


_CHANGE_KEYS = (
    "relative_change",
    "cosine",
    "sign_agreement",
    "delta_norm",
    "delta_stable_rank",
    "delta_effective_rank",
    "delta_rank_90",
    "delta_singular_values",
)


def _change_row(name: str, shape, status: str, reason: str | None = None, **values) -> dict:
    row = {"name": name, "shape": list(shape), "status": status, "reason": reason}
    row.update({key: values.get(key) for key in _CHANGE_KEYS})
    return row


def compare_checkpoints(base: str | Path, other: str | Path) -> Table:
    """Per-tensor change from the checkpoint ``base`` (``A``) to ``other`` (``B``), streamed.

    Row keys: ``name``; ``shape`` (of ``A``); ``status``: ``"compared"``, ``"unchanged"`` (``B == A``:
    the rank measures of a zero difference are undefined and stay None), ``"mismatch"`` (absent on one
    side, different shapes, not floating-point; ``reason`` says which) ; ``reason``; ``relative_change``
    (``||B - A||_F / ||A||_F``, None when ``A`` is zero); ``cosine`` (of ``A`` and ``B``);
    ``sign_agreement``; ``delta_norm`` (``||B - A||_F``); for 2-D tensors that changed, the keys of
    :func:`delta_spectrum`, else None.

    Summary keys: ``compared`` (tensors compared, unchanged ones included), ``changed``, ``mismatched``;
    over all compared tensors as one vector: ``relative_change``, ``cosine``, ``sign_agreement``.

    Raises:
        WeightkitError: a checkpoint cannot be read, or a tensor holds NaN/Inf (named).
    """
    refuse_quantized(base, verb="comparing checkpoints", instead=FULL_PRECISION_ONLY)
    refuse_quantized(other, verb="comparing checkpoints", instead=FULL_PRECISION_ONLY)
    rows = []
    base_sq = delta_sq = other_sq = dot = 0.0
    agree = entries = 0
    with CheckpointReader(base) as a_reader, CheckpointReader(other) as b_reader:
        readers = {"other": b_reader}
        for name in a_reader.names():
            reason = unpaired_reason(name, readers, a_reader)
            if reason is not None:
                rows.append(_change_row(name, a_reader.shape(name), "mismatch", reason))
                continue
            a = a_reader.get_finite(name).double()
            b = b_reader.get_finite(name).double()
            delta = b - a
            base_sq += float(a.square().sum())
            other_sq += float(b.square().sum())
            delta_sq += float(delta.square().sum())
            dot += float((a * b).sum())
            agree += int((torch.sign(a) == torch.sign(b)).sum())
            entries += a.numel()
            values = {
                "relative_change": relative_change(a, b),
                "cosine": cosine(a, b),
                "sign_agreement": sign_agreement(a, b),
                "delta_norm": float(torch.linalg.vector_norm(delta)),
            }
            unchanged = not bool(delta.any())
            if a.dim() == 2 and not unchanged:
                values.update(delta_spectrum(delta))
            reason = None if a.dim() == 2 or unchanged else "not a matrix: no spectrum of the difference"
            rows.append(
                _change_row(name, a.shape, "unchanged" if unchanged else "compared", reason, **values)
            )
        for name in names_absent_from_base(a_reader, readers):
            rows.append(_change_row(name, b_reader.shape(name), "mismatch", "absent in base"))
    compared = [row for row in rows if row["status"] != "mismatch"]
    summary = {
        "compared": len(compared),
        "changed": sum(row["status"] == "compared" for row in rows),
        "mismatched": len(rows) - len(compared),
        "relative_change": math.sqrt(delta_sq / base_sq) if base_sq else None,
        "cosine": dot / math.sqrt(base_sq * other_sq) if base_sq and other_sq else None,
        "sign_agreement": agree / entries if entries else None,
    }
    return Table(rows, summary)
