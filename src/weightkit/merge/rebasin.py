"""Permutation alignment by weight matching (Git Re-Basin): the pure matching, over dicts of tensors.

Paper: Ainsworth, Hayase, Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
arXiv 2209.04836 (weight matching, section 3.2 and Algorithm 1).

Two networks trained from different random seeds can compute nearly the same function with their hidden
units in a different order, so averaging them unit by unit mixes unrelated units. Reordering the hidden
units of one network (and the matching rows/columns of the next layer) leaves its function exactly the
same; weight matching picks, for every such permutation, the order that makes the model's weights most
similar to a reference model's: it maximises ``sum_tensors <W_reference, P(W_model)>``. With several
interacting permutations this is hard, so the paper does coordinate descent: visit the permutations in a
random order, solve each one exactly as a linear assignment problem
(:func:`scipy.optimize.linear_sum_assignment` on the summed similarity matrix ``sum_W A_W B_W^T`` with
every other permutation held fixed), and repeat until a whole round improves nothing.

Pieces:

- :class:`PermutationSpec` says which axes of which tensors each permutation acts on. A permutation of
  ``n`` units may act on an axis of length ``n * b``: then it moves contiguous blocks of ``b`` entries
  together (``b = 1`` for neurons, ``b = head_dim`` for attention heads). An axis may also be made of
  consecutive sections that the permutation reorders alike (a fused query-key-value layer: its query
  rows, then its key rows, then its value rows).
- :func:`weight_matching` (the search), :func:`apply_permutation`, :func:`matching_objective`: pure
  functions over dicts of tensors.
- :func:`mlp_spec`: the spec of a chain of Linear layers.

Transformers (the specs of their blocks) and aligning a whole checkpoint are
:mod:`weightkit.merge.align` (``weightkit align``).

Deliberate deviations from the paper:

1. **A permutation changes only on a strict improvement.** The paper's code adopts each new assignment
   even when it only ties the current one; here the current permutation is kept unless the assignment
   raises the objective (by more than a relative ``1e-10``), so the objective never decreases and the
   result does not depend on how the solver breaks ties.
2. Similarity matrices are accumulated in float32 (float64 when the reference tensors are float64) and
   solved in float64.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["PermutationSpec", "weight_matching", "apply_permutation", "matching_objective", "mlp_spec"]

# An assignment must beat the current permutation by this fraction of the objective to replace it; below
# that the difference is summation rounding, and adopting it could make the descent cycle between ties.
_IMPROVEMENT_RTOL = 1e-10


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which tensors each permutation of hidden units acts on.

    Example, a ``Linear(10, 20) -> ReLU -> Linear(20, 2)`` network whose 20 hidden units may be
    reordered::

        PermutationSpec(
            sizes={"hidden": 20},
            axes={"0.weight": ("hidden", None), "0.bias": ("hidden",), "2.weight": (None, "hidden")},
        )

    Attributes:
        sizes: permutation name -> number of units it reorders (neurons, or heads for a head permutation).
        axes: tensor name -> one entry per axis of that tensor: the name of the permutation acting on the
            axis, or None. An axis of length ``size * b`` is permuted in contiguous blocks of ``b``
            entries (a head's ``head_dim`` rows move together). Tensors not listed are never changed.
        sections: tensor name -> the lengths of the consecutive sections its one permuted axis is made
            of, each reordered by the same permutation (blocks of ``length / size`` entries in each). A
            fused query-key-value layer's rows are ``(q_rows, k_rows, v_rows)``, a fused gate-up layer's
            ``(width, width)``. A tensor not listed is one section.

    Raises:
        WeightkitError: a size that is not a positive integer, an axis naming an unknown permutation, a
            permutation that acts on no tensor, or sections of a tensor not permuted along exactly one
            axis.
    """

    sizes: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    sections: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", dict(self.sizes))
        object.__setattr__(self, "axes", {name: tuple(axes) for name, axes in self.axes.items()})
        object.__setattr__(self, "sections", {name: tuple(s) for name, s in self.sections.items()})
        for perm, size in self.sizes.items():
            if type(size) is not int or size < 1:
                raise WeightkitError(f"permutation {perm} has size {size!r}; expected a positive integer")
        used = set()
        for name, axes in self.axes.items():
            for perm in axes:
                if perm is None:
                    continue
                if perm not in self.sizes:
                    raise WeightkitError(f"tensor {name} names permutation {perm!r}, which has no size")
                used.add(perm)
        unused = sorted(set(self.sizes) - used)
        if unused:
            raise WeightkitError(f"permutation {unused[0]} acts on no tensor")
        for name, lengths in self.sections.items():
            if sum(perm is not None for perm in self.axes.get(name, ())) != 1:
                raise WeightkitError(f"tensor {name} has sections but is not permuted along exactly one axis")
            if not lengths or any(type(n) is not int or n < 1 for n in lengths):
                raise WeightkitError(
                    f"tensor {name} has sections {list(lengths)}; expected positive integers"
                )

    def sections_of(self, name: str, length: int) -> tuple[int, ...]:
        """The section lengths of tensor ``name``'s permuted axis, of length ``length``."""
        return self.sections.get(name, (length,))

    def perm_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> the (tensor name, axis) pairs it acts on, in ``axes`` order."""
        result: dict[str, list[tuple[str, int]]] = {perm: [] for perm in self.sizes}
        for name, axes in self.axes.items():
            for axis, perm in enumerate(axes):
                if perm is not None:
                    result[perm].append((name, axis))
        return result


# -- pure core -----------------------------------------------------------------------------------------


def _check_state(state: Mapping[str, Tensor], spec: PermutationSpec, what: str) -> None:
    for name, axes in spec.axes.items():
        if name not in state:
            raise WeightkitError(f"tensor {name} of the permutation spec is missing from {what}")
        shape = tuple(state[name].shape)
        if len(shape) != len(axes):
            raise WeightkitError(
                f"tensor {name} of {what} has shape {list(shape)} but the permutation spec gives it "
                f"{len(axes)} axes"
            )
        for axis, perm in enumerate(axes):
            if perm is None:
                continue
            sections = spec.sections_of(name, shape[axis])
            if sum(sections) != shape[axis]:
                raise WeightkitError(
                    f"axis {axis} of tensor {name} of {what} has length {shape[axis]}, not the sum of its "
                    f"sections {list(sections)}"
                )
            if any(length % spec.sizes[perm] for length in sections):
                raise WeightkitError(
                    f"axis {axis} of tensor {name} of {what} has length {shape[axis]} (sections "
                    f"{list(sections)}), not a multiple of the {spec.sizes[perm]} units of permutation "
                    f"{perm} in each section"
                )


def _check_perms(perms: Mapping[str, Tensor], spec: PermutationSpec) -> dict[str, Tensor]:
    checked = {}
    for perm, size in spec.sizes.items():
        if perm not in perms:
            raise WeightkitError(f"no index tensor for permutation {perm}")
        index = torch.as_tensor(perms[perm]).long().reshape(-1).cpu()
        if index.numel() != size or not torch.equal(torch.sort(index).values, torch.arange(size)):
            raise WeightkitError(
                f"the index tensor for permutation {perm} is not a permutation of 0..{size - 1}"
            )
        checked[perm] = index
    return checked


def _unit_index(index: Tensor, length: int) -> Tensor:
    """Expand a permutation of ``n`` units to an axis of ``length = n * b`` entries (blocks of ``b``)."""
    block = length // index.numel()
    return (index[:, None] * block + torch.arange(block)).reshape(-1)


def _section_index(index: Tensor, sections: Sequence[int]) -> Tensor:
    """Expand a permutation of ``n`` units to an axis of consecutive ``sections``, each permuted alike."""
    parts, start = [], 0
    for length in sections:
        parts.append(start + _unit_index(index, length))
        start += length
    return torch.cat(parts)


def _unit_rows(tensor: Tensor, axis: int, size: int, sections: Sequence[int]) -> Tensor:
    """``tensor`` as one row per unit of ``axis``: the unit's entries of every section, flattened."""
    parts = tensor.split(list(sections), dim=axis)
    return torch.cat([part.movedim(axis, 0).reshape(size, -1) for part in parts], dim=1)


def _permuted(
    tensor: Tensor,
    spec: PermutationSpec,
    name: str,
    perms: Mapping[str, Tensor],
    skip_axis: int | None = None,
) -> Tensor:
    for axis, perm in enumerate(spec.axes[name]):
        if perm is not None and axis != skip_axis:
            index = _section_index(perms[perm], spec.sections_of(name, tensor.shape[axis]))
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _dot(a: Tensor, b: Tensor) -> float:
    """Inner product of two same-shaped tensors, summed in float64 (one float32-sized temporary)."""
    return float((a.float() * b.float()).sum(dtype=torch.float64))


def apply_permutation(
    state: Mapping[str, Tensor], spec: PermutationSpec, perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Reorder the hidden units of a state dict.

    Along an axis that permutation ``p`` acts on, entry (or block) ``i`` of the result is entry (block)
    ``perms[p][i]`` of the input, in each section of the axis.

    Args:
        state: tensor name -> tensor; must hold every tensor of ``spec``. Not modified.
        spec: the permutation spec.
        perms: permutation name -> 1-D index tensor (a permutation of ``0..size-1``), e.g. from
            :func:`weight_matching`.

    Returns:
        A new dict in ``state``'s order: permuted copies of the spec's tensors (same dtype and device);
        tensors outside the spec are the input tensors themselves.

    Raises:
        WeightkitError: a spec tensor is missing or has the wrong number of axes or an axis length that
            is not a multiple of its permutation's size, or an index tensor is missing or not a permutation.
    """
    _check_state(state, spec, "the state dict")
    checked = _check_perms(perms, spec)
    return {
        name: _permuted(tensor, spec, name, checked) if name in spec.axes else tensor
        for name, tensor in state.items()
    }


def matching_objective(
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, Tensor] | None = None,
) -> float:
    """The quantity weight matching maximises: ``sum over spec tensors of <reference, permuted other>``.

    Args:
        reference: the reference state dict.
        other: the state dict to permute.
        spec: the permutation spec; only its tensors count.
        perms: the permutations applied to ``other`` (None: identity, i.e. the objective before matching).

    Returns:
        The sum of the inner products, accumulated in float64.
    """
    _check_state(reference, spec, "the reference")
    _check_state(other, spec, "the other state dict")
    checked = _check_perms(perms, spec) if perms is not None else None
    total = 0.0
    for name in spec.axes:
        b = other[name] if checked is None else _permuted(other[name], spec, name, checked)
        total += _dot(reference[name], b)
    return total


def weight_matching(
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Find the permutations of ``other``'s hidden units that make its weights most like ``reference``'s.

    Coordinate descent as in the paper: each round visits the permutations in a random order (drawn from
    ``seed``); for each one, with every other permutation held at its current value, it builds the
    similarity matrix ``S = sum_(W, axis) A_W B_W^T`` (``A_W`` is the reference tensor with the axis
    moved first and flattened per unit, its sections side by side, ``B_W`` the other tensor likewise
    with its other permuted axes already permuted), solves ``max_P <S, P>`` exactly with
    :func:`scipy.optimize.linear_sum_assignment`, and keeps the result if it improves the objective.
    The search stops after a round without improvement or after ``max_iter`` rounds. For permutations
    that share no tensor (the blocks of a transformer) one round finds the optimum and a second confirms.

    Args:
        reference: tensor name -> tensor of the model to align to. Not modified.
        other: the same tensors (same names and shapes) of the model to permute. Not modified.
        spec: which axes each permutation acts on.
        max_iter: maximum number of rounds over all permutations.
        seed: seed of the visiting order; the same inputs and seed give the same result.

    Returns:
        Permutation name -> int64 index tensor ``p`` such that ``apply_permutation(other, spec, perms)``
        puts unit ``p[i]`` of ``other`` at position ``i``.

    Raises:
        WeightkitError: ``max_iter < 1``, a spec tensor missing from either dict, shapes that differ
            between the two, an axis length that is not a multiple of its permutation's size, or NaN/Inf
            weights.
    """
    if max_iter < 1:
        raise WeightkitError(f"max_iter must be at least 1, got {max_iter}")
    _check_state(reference, spec, "the reference")
    _check_state(other, spec, "the other state dict")
    work: dict[str, tuple[Tensor, Tensor]] = {}
    for name in spec.axes:
        a, b = reference[name], other[name]
        if a.shape != b.shape:
            raise WeightkitError(
                f"tensor {name} has shape {list(a.shape)} in the reference but {list(b.shape)} in the other"
            )
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        work[name] = (a.detach().to(dtype), b.detach().to(device=a.device, dtype=dtype))

    perms = {perm: torch.arange(size) for perm, size in spec.sizes.items()}
    by_perm = spec.perm_axes()
    order = sorted(spec.sizes)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        improved = False
        for i in rng.permutation(len(order)):
            perm = order[i]
            size = spec.sizes[perm]
            similarity = None
            for name, axis in by_perm[perm]:
                a, b = work[name]
                b = _permuted(b, spec, name, perms, skip_axis=axis)
                sections = spec.sections_of(name, a.shape[axis])
                term = _unit_rows(a, axis, size, sections) @ _unit_rows(b, axis, size, sections).T
                similarity = term if similarity is None else similarity + term
            s = similarity.double().cpu().numpy()
            if not np.isfinite(s).all():
                tensors = ", ".join(name for name, _ in by_perm[perm])
                raise WeightkitError(
                    f"NaN/Inf in the similarity of permutation {perm}; check tensors {tensors}"
                )
            rows, cols = linear_sum_assignment(s, maximize=True)
            current = float(s[np.arange(size), perms[perm].numpy()].sum())
            best = float(s[rows, cols].sum())
            if best - current > _IMPROVEMENT_RTOL * max(abs(best), abs(current)):
                perms[perm] = torch.from_numpy(cols.astype(np.int64))
                improved = True
        if not improved:
            break
    return perms


# -- spec builders -------------------------------------------------------------------------------------


def mlp_spec(state: Mapping[str, Tensor]) -> PermutationSpec:
    """Permutation spec of a plain chain of Linear layers, e.g. ``nn.Sequential(Linear, ReLU, Linear)``.

    Every hidden layer's output units get one permutation (named after that layer's prefix, ``"0"`` for
    ``"0.weight"``); it acts on the layer's weight rows and bias and on the next layer's weight columns.
    The input of the first layer and the output of the last are not permuted. Any elementwise activation
    between the layers keeps this a symmetry.

    Args:
        state: the ``state_dict()``: ``*.weight`` (2-D) and optional ``*.bias`` tensors, layers in order.

    Returns:
        The spec.

    Raises:
        WeightkitError: a tensor that is not a Linear weight or bias, fewer than two layers, or layers
            whose sizes do not chain (``out`` of one != ``in`` of the next).
    """
    weights: list[str] = []  # one per layer, in order
    for name, tensor in state.items():
        leaf = name.rpartition(".")[2]
        if leaf == "weight" and tensor.ndim == 2:
            weights.append(name)
        elif leaf == "bias" and tensor.ndim == 1:
            if name.removesuffix("bias") + "weight" not in state:
                raise WeightkitError(f"tensor {name} is a bias without a weight")
        else:
            raise WeightkitError(
                f"tensor {name} (shape {list(tensor.shape)}) is not the 2-D weight or 1-D bias of a Linear "
                f"layer; mlp_spec handles plain chains of Linear layers only"
            )
    if len(weights) < 2:
        raise WeightkitError(
            f"an MLP needs at least two Linear layers to have hidden units, got {len(weights)}"
        )
    sizes: dict[str, int] = {}
    axes: dict[str, tuple[str | None, ...]] = {}
    previous: str | None = None
    for i, weight in enumerate(weights):
        out_features, in_features = state[weight].shape
        if i > 0 and in_features != state[weights[i - 1]].shape[0]:
            raise WeightkitError(
                f"{weight} takes {in_features} inputs but {weights[i - 1]} gives "
                f"{state[weights[i - 1]].shape[0]} outputs: not a chain of Linear layers"
            )
        # Named after the layer whose outputs it reorders ("0" for "0.weight").
        perm = weight.removesuffix("weight").removesuffix(".") if i < len(weights) - 1 else None
        if perm is not None:
            sizes[perm] = out_features
        axes[weight] = (perm, previous)
        bias = weight.removesuffix("weight") + "bias"
        if bias in state:
            if state[bias].shape[0] != out_features:
                raise WeightkitError(f"tensor {bias} does not have the {out_features} entries of {weight}")
            axes[bias] = (perm,)
        previous = perm
    # The last layer's bias and output are not permuted; drop entries with no permutation at all.
    axes = {name: a for name, a in axes.items() if any(p is not None for p in a)}
    return PermutationSpec(sizes, axes)
