"""Agreement between several fine-tunes of one base: TIES sign conflicts and the cosine of task vectors.

For a base ``θ_0`` and fine-tunes ``θ_1..θ_k`` the task vectors are ``τ_i = θ_i - θ_0``.
:func:`task_vector_agreement` streams the checkpoints tensor by tensor and reports the sign-conflict rate of
"TIES-Merging: Resolving Interference When Merging Models" (Yadav et al., arXiv 2306.01708) per tensor and
overall, and the ``k x k`` cosine matrix of the task vectors, each taken as one vector over the whole model
(accumulated tensor by tensor as a Gram matrix ``G[i, j] = <τ_i, τ_j>``).

What counts as a conflict: an entry where, among the task vectors that are nonzero there, at least one is
positive and one negative (:func:`sign_conflicts`), counted over all entries. Optionally after TIES' trim
step (:func:`trim_to_density`). Deviation from the paper: the trim keeps the top ``density`` share of each
task vector per tensor (as mergekit's TIES does, and so that it streams), not one top-k over the whole
flattened model as the paper's code does (``weightkit.merge`` offers both).
"""

import math
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader
from weightkit.errors import WeightkitError
from weightkit.inspect.change import FULL_PRECISION_ONLY, Table, names_absent_from_base, unpaired_reason
from weightkit.quantized.compressed_tensors import refuse_quantized

__all__ = [
    "trim_to_density",
    "sign_conflicts",
    "sign_conflict_rate",
    "pairwise_cosine",
    "task_vector_agreement",
]


def trim_to_density(task_vectors: Tensor, density: float) -> Tensor:
    """TIES' trim step: in each row of ``task_vectors`` (``[k, n]``, one task vector per row) keep the
    ``int(density * n)`` entries of largest magnitude and zero the rest (ties broken by ``torch.topk``); the
    count is rounded down as in mergekit's and ``weightkit.merge``'s per-tensor trim, so it may keep none."""
    if not 0 < density <= 1:
        raise WeightkitError(f"density must be in (0, 1], got {density}")
    keep = int(density * task_vectors.shape[1])
    kept = torch.zeros_like(task_vectors)
    index = task_vectors.abs().topk(keep, dim=1).indices
    return kept.scatter_(1, index, task_vectors.gather(1, index))


def sign_conflicts(task_vectors: Tensor) -> Tensor:
    """Boolean mask ``[n]``: entries where the nonzero task vectors (rows of ``[k, n]``) disagree in sign,
    i.e. at least one is positive and at least one negative. Zeros (unchanged or trimmed) take no side."""
    return (task_vectors > 0).any(dim=0) & (task_vectors < 0).any(dim=0)


def sign_conflict_rate(task_vectors: Tensor, density: float | None = None) -> float:
    """Share of the ``n`` entries that are :func:`sign_conflicts` of ``task_vectors`` (``[k, n]``),
    after :func:`trim_to_density` when ``density`` is given."""
    if density is not None:
        task_vectors = trim_to_density(task_vectors, density)
    return float(sign_conflicts(task_vectors).double().mean())


def pairwise_cosine(gram: Tensor) -> Tensor:
    """Cosine matrix from a Gram matrix ``G[i, j] = <τ_i, τ_j>``: ``G[i, j] / sqrt(G[i, i] G[j, j])``.
    A zero task vector has no direction: its row and column are NaN."""
    norms = gram.diagonal().sqrt()
    outer = torch.outer(norms, norms)
    return torch.where(outer > 0, gram / outer, torch.full_like(gram, math.nan))


def task_vector_agreement(
    base: str | Path, finetunes: list[str | Path], *, density: float | None = None
) -> Table:
    """TIES sign conflicts and pairwise cosine of the task vectors ``τ_i = θ_i - θ_base``, streamed.

    An entry is conflicting when, among the task vectors that are nonzero there, at least one is
    positive and one negative (:func:`sign_conflicts`). Without ``density`` the raw task vectors are used;
    with it, each task vector is first trimmed to its ``density`` share of largest-magnitude entries, as
    TIES' trim step does, per tensor (module docstring).

    Row keys: ``name``, ``shape``, ``status`` (``"compared"`` or ``"mismatch"``), ``reason``,
    ``sign_conflict_rate`` (conflicting entries / entries of the tensor), ``cosine`` (the ``k x k``
    cosine matrix of this tensor's task vectors, nested lists; NaN where a task vector is zero).

    Summary keys: ``models`` (the fine-tunes as given), ``density``, ``sign_conflict_rate`` (over every
    compared entry of the model), ``cosine`` (``k x k`` nested lists: each task vector as one vector over
    all compared tensors), ``compared``, ``mismatched``.

    Raises:
        WeightkitError: fewer than two fine-tunes, one given twice, an invalid ``density``, an unreadable
            checkpoint, or a tensor holding NaN/Inf (named).
    """
    if len(finetunes) < 2:
        raise WeightkitError(f"task-vector agreement needs at least two fine-tunes, got {len(finetunes)}")
    if density is not None and not 0 < density <= 1:
        raise WeightkitError(f"density must be in (0, 1], got {density}")
    labels = [str(path) for path in finetunes]
    if len(set(labels)) < len(labels):
        raise WeightkitError(f"a fine-tune is given twice: {labels}")
    for path in (base, *finetunes):
        refuse_quantized(path, verb="task-vector agreement", instead=FULL_PRECISION_ONLY)
    k = len(finetunes)
    gram = torch.zeros(k, k, dtype=torch.float64)
    conflicts = entries = 0
    rows = []
    with ExitStack() as stack:
        base_reader = stack.enter_context(CheckpointReader(base))
        tuned = [stack.enter_context(CheckpointReader(path)) for path in finetunes]
        readers = dict(zip(labels, tuned, strict=True))
        for name in base_reader.names():
            shape = list(base_reader.shape(name))
            reason = unpaired_reason(name, readers, base_reader)
            if reason is not None:
                rows.append(_agreement_row(name, shape, "mismatch", reason))
                continue
            theta_0 = base_reader.get_finite(name).double().reshape(-1)
            # One row per fine-tune: k copies of this tensor, never of the model.
            taus = torch.stack([reader.get_finite(name).double().reshape(-1) - theta_0 for reader in tuned])
            tensor_gram = taus @ taus.T
            gram += tensor_gram
            trimmed = taus if density is None else trim_to_density(taus, density)
            tensor_conflicts = int(sign_conflicts(trimmed).sum())
            conflicts += tensor_conflicts
            entries += taus.shape[1]
            rows.append(
                _agreement_row(
                    name,
                    shape,
                    "compared",
                    None,
                    tensor_conflicts / taus.shape[1],
                    pairwise_cosine(tensor_gram).tolist(),
                )
            )
        for name, labels_with_it in names_absent_from_base(base_reader, readers).items():
            shape = list(readers[labels_with_it[0]].shape(name))
            reason = f"absent in base (present in {', '.join(labels_with_it)})"
            rows.append(_agreement_row(name, shape, "mismatch", reason))
    compared = sum(row["status"] == "compared" for row in rows)
    summary = {
        "models": labels,
        "density": density,
        "sign_conflict_rate": conflicts / entries if entries else None,
        "cosine": pairwise_cosine(gram).tolist(),
        "compared": compared,
        "mismatched": len(rows) - compared,
    }
    return Table(rows, summary)


def _agreement_row(name, shape, status, reason, rate=None, cosines=None) -> dict:
    return {
        "name": name,
        "shape": shape,
        "status": status,
        "reason": reason,
        "sign_conflict_rate": rate,
        "cosine": cosines,
    }
