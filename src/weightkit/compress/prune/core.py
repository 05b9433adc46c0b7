"""What every pruning method shares: the ``sparsity`` setting, layer selection, and mask selection.

A pruning method scores each weight (magnitude, a random number, Wanda's ``|W| * ||x||``, SparseGPT's
``w^2 / [H^-1]_jj^2``) and zeroes the lowest-scored ones in a *comparison group*: the whole layer, one
output row, or, for N:M semi-structured sparsity, every ``M`` consecutive input weights of a row (of
which ``N`` are zeroed, the pattern sparse tensor cores run fast: 2:4 and 4:8). The mask functions here
are pure: scores in, a boolean mask of the weights to zero out.
"""

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from weightkit.compress.quant.module import refuse_conv1d
from weightkit.errors import WeightkitError
from weightkit.progress import track
from weightkit.select import DEFAULT_IGNORE, select_modules

__all__ = [
    "SPARSITY_FILE",
    "PruneFields",
    "parse_sparsity",
    "layer_mask",
    "row_mask",
    "nm_mask",
    "prune_mask",
    "selected_prunable",
    "measured_sparsity",
    "prune_each_weight",
]

# Where a pruned checkpoint records its sparsity (README's "Pruning").
SPARSITY_FILE = "sparsity.json"

_NM = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_sparsity(value: float | str) -> tuple[float, tuple[int, int] | None]:
    """``(fraction zeroed, (N, M) or None)`` of a ``sparsity`` setting: a fraction in (0, 1) for
    unstructured sparsity, or ``"N:M"`` for N zeros in every M consecutive input weights of a row.

    Raises:
        WeightkitError: a fraction outside (0, 1), a malformed ``"N:M"``, ``N < 1`` or ``N >= M``.
    """
    if isinstance(value, str):
        found = _NM.fullmatch(value)
        if found is None:
            try:
                value = float(value)
            except ValueError:
                raise WeightkitError(
                    f"sparsity must be a fraction in (0, 1) or 'N:M' such as '2:4', got {value!r}"
                ) from None
        else:
            n, m = int(found[1]), int(found[2])
            if not 1 <= n < m:
                raise WeightkitError(
                    f"sparsity {value!r}: N:M zeroes N of every M weights, so it needs 1 <= N < M"
                )
            return n / m, (n, m)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise WeightkitError(f"sparsity must be a fraction in (0, 1) (or 'N:M' such as '2:4'), got {value!r}")
    return float(value), None


@dataclass
class PruneFields:
    """Which linear layers are pruned, and how many of their weights become zero.

    Attributes:
        sparsity: the fraction of each selected weight set to zero, in (0, 1) (0.5: half), or ``"N:M"``
            (``"2:4"``, ``"4:8"``): N zeros in every M consecutive input weights of each output row, the
            semi-structured pattern that sparse tensor cores (NVIDIA Ampere and later) accelerate.
            M must divide each selected layer's input width.
        targets: module names or ``re:`` patterns to prune; ``_default`` means every linear layer.
        ignore: names or patterns left dense (default: embeddings, lm_head, norms, pooler).
    """

    sparsity: float | str = 0.5
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    def __post_init__(self):
        parse_sparsity(self.sparsity)

    @property
    def fraction(self) -> float:
        """The fraction of each selected weight zeroed (N/M for N:M)."""
        return parse_sparsity(self.sparsity)[0]

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` for semi-structured sparsity, ``None`` for unstructured."""
        return parse_sparsity(self.sparsity)[1]

    @property
    def structure(self) -> str:
        """``"N:M"`` or ``"unstructured"``, as compressed-tensors' ``sparsity_structure`` names it."""
        n_m = self.n_m
        return "unstructured" if n_m is None else f"{n_m[0]}:{n_m[1]}"


def _smallest(scores: Tensor, k: int) -> Tensor:
    """A mask of the ``k`` smallest entries along the last dimension (ties: the first ones)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, order, True)
    return mask


def layer_mask(scores: Tensor, fraction: float) -> Tensor:
    """Zero ``floor(fraction * numel)`` weights: the lowest-scored of the whole tensor."""
    k = math.floor(fraction * scores.numel())
    return _smallest(scores.reshape(-1), k).reshape(scores.shape)


def row_mask(scores: Tensor, fraction: float) -> Tensor:
    """Zero ``floor(fraction * columns)`` weights in every row: the row's lowest-scored."""
    return _smallest(scores, math.floor(fraction * scores.shape[-1]))


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Zero the ``n`` lowest-scored weights in every ``m`` consecutive columns of each row.

    Raises:
        WeightkitError: ``m`` does not divide the columns.
    """
    rows, cols = scores.shape
    if cols % m:
        raise WeightkitError(f"{n}:{m} sparsity needs the columns ({cols}) to be a multiple of {m}")
    return _smallest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def prune_mask(scores: Tensor, config: PruneFields, *, per_row: bool) -> Tensor:
    """The mask ``config``'s sparsity selects from ``scores`` ``[out, in]``: N:M groups, else the lowest
    fraction of each row (``per_row``) or of the whole layer."""
    n_m = config.n_m
    if n_m is not None:
        return nm_mask(scores, *n_m)
    return (row_mask if per_row else layer_mask)(scores, config.fraction)


def selected_prunable(model: nn.Module, config: PruneFields) -> dict[str, nn.Linear]:
    """The linear layers ``config`` selects, checked before any work.

    Raises:
        WeightkitError: nothing selected, a GPT-2 style ``Conv1D`` layer (its weight is stored transposed,
            ``[in, out]``; not supported), or an N:M whose M does not divide a layer's input width (named).
    """
    refuse_conv1d(model, "weightkit prunes Linear layers only")
    linears = select_modules(model, targets=config.targets, ignore=config.ignore)
    if not linears:
        raise WeightkitError("no linear layer selected for pruning (check targets and ignore)")
    n_m = config.n_m
    if n_m is not None:
        for name, linear in linears.items():
            if linear.in_features % n_m[1]:
                raise WeightkitError(
                    f"sparsity {config.structure}: {name} has {linear.in_features} inputs, not a multiple of "
                    f"{n_m[1]}, so its rows cannot be split into groups of {n_m[1]} (add it to ignore)"
                )
    return linears


def measured_sparsity(weight: Tensor) -> float:
    """The fraction of ``weight``'s entries that are exactly zero."""
    return float((weight == 0).sum()) / weight.numel()


def prune_each_weight(
    model: nn.Module,
    config,
    *,
    progress: bool = True,
    device: torch.device | None = None,
    **_unused,
) -> nn.Module:
    """The method of the pruning configs that need no data (magnitude, random): each selected layer's
    weight is replaced, in place, by ``config.prune_weight(weight, module_name)`` (computed on ``device``,
    one weight at a time, and put back where the weight was). ``compress_checkpoint`` streams the same
    ``prune_weight`` tensor by tensor."""
    linears = selected_prunable(model, config)
    for name, linear in track(linears.items(), config.LABEL, total=len(linears), enabled=progress):
        weight = linear.weight.detach()
        pruned = config.prune_weight(weight.to(device or weight.device), name)
        weight.copy_(pruned.to(weight.device))
    return model
