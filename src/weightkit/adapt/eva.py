"""EVA: initialise LoRA's ``A`` with the directions that explain the most variance of each layer's inputs.

Paper: Paischer, Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter, "One Initialization to Rule them
All: Fine-tuning via Explained Variance Adaptation", arXiv 2410.07170 (later versions: "Parameter
Efficient Fine-tuning via Explained Variance Adaptation", NeurIPS 2025). The authors' implementation is
PEFT's ``init_lora_weights="eva"`` (``peft/tuners/lora/eva.py``); this module follows its semantics.

EVA is an initialisation of plain LoRA, not a new layer. Calibration batches run through the model; the
input rows ``x`` of every targeted linear layer feed an incremental SVD (one small SVD per batch, memory
independent of the number of batches). A layer's LoRA ``A`` becomes its top right-singular vectors
(``B`` stays zero, so the model's outputs are unchanged at initialisation). Ranks are redistributed: with a
budget of ``rank * n_layers`` components (what uniform LoRA would use), each layer offers its first
``round(rho * rank)`` components and the budget goes to the components with the largest explained-variance
ratios over all layers, so ``rho = 1`` keeps the uniform rank and a layer may end with rank 0 (PEFT then
leaves that layer without an adapter). A layer stops updating once the components it needs have converged:
each has cosine similarity of at least ``tau`` with the same component one batch earlier.

As in PEFT: activations are centred (the incremental SVD is an incremental PCA, Ross et al. 2008, with the
mean-correction row), so explained-variance ratios are ``sigma_i**2 / total centred sum of squares`` of
the layer's inputs, comparable across layers; only tokens with ``attention_mask == 1`` count, and when a
batch has ``labels``, positions labelled -100 are left out too; ``whiten`` divides each row of ``A`` by the
square root of its singular value; the model runs in eval mode under ``no_grad``; with
``adjust_scaling_factors`` (:func:`eva_patterns`) a layer of rank ``r_i`` gets ``alpha * r_i / rank`` so every
layer keeps the scaling ``alpha / rank``.

Deliberate deviations from PEFT:

- Each incremental step is an exact thin SVD (``torch.linalg.svd``), not PEFT's randomised
  ``torch.svd_lowrank`` (``q = 2k``, seed 42): deterministic without seeding, and exact whenever the kept
  components span all the data seen (tests rely on that); slower for very wide layers.
- Convergence uses ``|cos|`` (singular vectors are defined up to sign); components are still returned with
  PEFT's sign convention (the largest-magnitude entry of each vector positive).
- The batches are read once (at most ``max_batches``); PEFT cycles the dataloader until every layer has
  converged. Layers still unconverged when the data runs out keep their current estimate, with a warning.
- A layer offers at most ``min(round(rho * rank), in_features, out_features)`` components (PEFT: only
  ``round(rho * rank)``): a LoRA update cannot have rank above the layer's smaller side.
- Layers fed the same input (q/k/v projections) each run their own SVD; PEFT detects equal inputs and
  computes one. Results are identical, only slower.
"""

import math
import warnings
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from itertools import islice

import torch
from torch import Tensor, nn

from weightkit.adapt.layer import LINEAR_TYPES
from weightkit.errors import WeightkitError
from weightkit.linalg import largest_entry_signs
from weightkit.progress import track
from weightkit.runtime.training import forward_batch

__all__ = [
    "SVDState",
    "incremental_svd",
    "converged_components",
    "redistribute_ranks",
    "eva_components",
    "eva_patterns",
]

# Positions with this label are ignored by the loss (prompt tokens, padding); EVA leaves them out, as PEFT.
_IGNORED_LABEL = -100


@dataclass
class SVDState:
    """The running centred SVD of every row seen so far, truncated to its top components.

    Attributes:
        components: ``[k, features]`` top right-singular vectors of the centred rows (orthonormal rows,
            largest singular value first).
        singular_values: ``[k]``, descending.
        mean: ``[features]`` mean of all rows seen (float64).
        n_rows: how many rows were seen.
        total_sum_squares: sum of squared deviations from ``mean`` over all rows and features (float64),
            the total variance the explained-variance ratios are measured against.
    """

    components: Tensor
    singular_values: Tensor
    mean: Tensor
    n_rows: int
    total_sum_squares: Tensor

    @property
    def explained_variance_ratio(self) -> Tensor:
        """``[k]`` share of the rows' total variance along each component."""
        total = self.total_sum_squares.clamp_min(torch.finfo(torch.float64).tiny)
        return (self.singular_values.double() ** 2 / total).to(self.singular_values.dtype)


def incremental_svd(state: SVDState | None, rows: Tensor, n_components: int) -> SVDState:
    """Fold a batch of rows into the running centred SVD (incremental PCA, Ross et al. 2008).

    The old state ``diag(S) @ V`` summarises the centred rows seen so far; stacking it on the batch's
    centred rows and one mean-correction row ``sqrt(n_old * m / n) * (mean_batch - mean_old)`` gives a
    matrix with the same scatter matrix as all rows centred on their joint mean, so its SVD is the SVD of
    all rows. Keeping only the top ``n_components`` is the one approximation: the update is exact when
    the kept components span the centred data (e.g. ``n_components >= features``).

    Args:
        state: the state after earlier batches, or None before the first.
        rows: ``[m, features]`` new rows (computed in float32 at least).
        n_components: ``k``, how many components to keep (fewer while fewer rows have been seen).

    Returns:
        The new state (``state`` itself, possibly None, when ``rows`` is empty).
    """
    if rows.shape[0] == 0:
        return state
    rows = rows.float() if rows.dtype not in (torch.float32, torch.float64) else rows
    m = rows.shape[0]
    batch_mean = rows.double().mean(dim=0)
    centred = rows - batch_mean.to(rows.dtype)
    batch_sum_squares = centred.double().square().sum()
    if state is None:
        n_rows, mean, total_sum_squares, stacked = m, batch_mean, batch_sum_squares, centred
    else:
        n_rows = state.n_rows + m
        shift = batch_mean - state.mean
        weight = state.n_rows * m / n_rows
        mean = state.mean + shift * (m / n_rows)
        total_sum_squares = state.total_sum_squares + batch_sum_squares + weight * shift.square().sum()
        previous = state.singular_values[:, None] * state.components
        correction = (math.sqrt(weight) * shift).to(rows.dtype)[None, :]
        stacked = torch.cat([previous.to(rows.dtype), centred, correction])
    _, singular_values, components = torch.linalg.svd(stacked, full_matrices=False)
    return SVDState(
        # Each row's largest-magnitude entry positive (PEFT's ``svd_flip`` on ``V``).
        components=components[:n_components] * largest_entry_signs(components[:n_components], dim=1)[:, None],
        singular_values=singular_values[:n_components],
        mean=mean,
        n_rows=n_rows,
        total_sum_squares=total_sum_squares,
    )


def converged_components(previous: Tensor | None, current: Tensor, *, tau: float, length: int) -> Tensor:
    """Which components stopped moving: ``|cos(previous_i, current_i)| >= tau``, as a ``[length]`` bool.

    Components not computed yet (beyond either tensor's rows, or all of them before a previous estimate
    exists) count as not converged.
    """
    converged = torch.zeros(length, dtype=torch.bool)
    if previous is None:
        return converged
    k = min(previous.shape[0], current.shape[0], length)
    similarity = torch.nn.functional.cosine_similarity(previous[:k], current[:k], dim=1).abs()
    converged[:k] = (similarity >= tau).cpu()
    return converged


def redistribute_ranks(
    explained_variance_ratios: Mapping[str, Tensor], *, rank: int, rho: float
) -> dict[str, int]:
    """Share a budget of ``rank * n_layers`` components among layers by explained variance.

    Every layer offers its first ``round(rho * rank)`` components (fewer if its ratio vector is shorter);
    the budget goes to the offered components with the largest explained-variance ratios over all layers.
    Ties go to the layer listed first.

    Args:
        explained_variance_ratios: ``{layer: [k] ratios, descending}``.
        rank: ``r``, the uniform LoRA rank the budget is measured in (>= 1).
        rho: how far a layer may exceed ``r`` (>= 1; ``1`` keeps every layer at ``r`` if it has ``r``).

    Returns:
        ``{layer: rank}`` in the input's order; a layer may get 0. Each rank is at most ``round(rho * rank)``
        and the ranks sum to at most ``rank * n_layers`` (less only if the layers offer fewer components).

    Raises:
        WeightkitError: no layers, ``rank < 1`` or ``rho < 1``.
    """
    _check_rank_rho(rank, rho)
    if not explained_variance_ratios:
        raise WeightkitError("eva: no layers to share the rank budget among")
    names = list(explained_variance_ratios)
    cap = round(rho * rank)
    offered = [explained_variance_ratios[name].detach().flatten()[:cap].double().cpu() for name in names]
    owners = torch.cat([torch.full((len(v),), i) for i, v in enumerate(offered)])
    chosen = torch.sort(torch.cat(offered), descending=True, stable=True).indices[: rank * len(names)]
    counts = torch.bincount(owners[chosen], minlength=len(names))
    return dict(zip(names, counts.tolist(), strict=True))


def _check_rank_rho(rank: int, rho: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise WeightkitError(f"eva: rank must be an integer >= 1, got {rank!r}")
    if not rho >= 1:
        raise WeightkitError(f"eva: rho must be >= 1 (1 keeps the uniform rank), got {rho}")


def _linear_of(model: nn.Module, name: str) -> nn.Module:
    """The linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) behind module ``name`` (the module itself or an
    adapter layer's ``base_layer``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise WeightkitError(f"eva: the model has no module named {name!r}") from None
    linear = getattr(module, "base_layer", module)
    if not isinstance(linear, LINEAR_TYPES):
        raise WeightkitError(
            f"eva: {name} is a {type(linear).__name__}; EVA initialises nn.Linear and Conv1D layers only"
        )
    return linear


def _token_mask(batch) -> Tensor | None:
    """``[batch, seq]`` bool of the positions that count: attention_mask 1 and, with per-token labels
    (language modelling), label != -100. A classifier's labels (one per sequence) say nothing of positions."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    mask = mask.bool() if isinstance(mask, Tensor) else None
    labels, ids = batch.get("labels"), batch.get("input_ids")
    if isinstance(labels, Tensor) and isinstance(ids, Tensor) and labels.shape == ids.shape:
        kept = labels != _IGNORED_LABEL
        mask = kept if mask is None else mask & kept
    return mask


def eva_components(
    model: nn.Module,
    module_names: list[str],
    batches: Iterable,
    *,
    rank: int,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """EVA's LoRA ``A`` for each named layer, from the layer inputs the calibration batches produce.

    Runs ``model`` (in eval mode) on the batches, feeds each layer's input rows (the tokens that count, see
    the module docstring) into its :func:`incremental_svd`, redistributes ranks after every batch
    (:func:`redistribute_ranks`) and stops a layer once the components it is assigned have converged
    (:func:`converged_components`); stops reading batches when every layer has.

    Args:
        model: the model; the named modules are linear layers (``nn.Linear``, GPT-2's ``Conv1D``) or adapter
            layers wrapping one (their input is captured, so run it with adapters that do not change
            activations, e.g. ``B = 0``).
        module_names: full names of the layers to initialise.
        batches: calibration batches: dicts the model takes as keyword arguments (``input_ids``,
            ``attention_mask``, optionally ``labels``) or tensors passed positionally (every row counts).
        rank: ``r``, the uniform LoRA rank; the budget is ``r * len(module_names)`` components.
        rho: a layer may get up to ``round(rho * r)`` components (>= 1; 1 means no redistribution), and
            never more than its smaller side.
        tau: cosine-similarity threshold in [0, 1] at which a component counts as converged.
        whiten: divide each row of ``A`` by the square root of its singular value.
        max_batches: read at most this many batches (None: all of them).
        progress: show a progress bar (when the number of batches is known).

    Returns:
        ``{module name: A}`` with ``A`` of shape ``[r_i, in_features]`` (orthonormal rows unless ``whiten``)
        in float32 (the caller rounds to the adapter's dtype) on the layer weight's device; ``r_i`` may be 0
        (no adapter for that layer).

    Raises:
        WeightkitError: bad ``rank``/``rho``/``tau``/``max_batches``, an unknown or non-linear module, no
            batches, no counted tokens reaching a layer, or a layer input that does not line up with the
            batch's attention mask.
    """
    _check_rank_rho(rank, rho)
    if not 0 <= tau <= 1:
        raise WeightkitError(f"eva: tau must be in [0, 1], got {tau}")
    if max_batches is not None and max_batches < 1:
        raise WeightkitError(f"eva: max_batches must be at least 1, got {max_batches}")
    if not module_names or len(set(module_names)) != len(module_names):
        raise WeightkitError(
            f"eva: module_names must be a non-empty list of distinct names, got {module_names}"
        )
    linears = {name: _linear_of(model, name) for name in module_names}
    n_components = {name: min(round(rho * rank), *linear.weight.shape) for name, linear in linears.items()}

    states: dict[str, SVDState | None] = dict.fromkeys(module_names)
    converged = {name: torch.zeros(n_components[name], dtype=torch.bool) for name in module_names}
    ranks = dict(n_components)  # before the first redistribution every offered component must converge
    updating: set[str] = set()
    token_mask: Tensor | None = None

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in updating:
                return
            if not args:
                raise WeightkitError(f"eva: {name} was called without a positional input to capture")
            x = args[0].detach()
            if token_mask is None:
                rows = x.reshape(-1, x.shape[-1])
            elif x.shape[:-1] == token_mask.shape:
                rows = x[token_mask.to(x.device)]
            else:
                raise WeightkitError(
                    f"eva: {name} got an input of shape {tuple(x.shape)} that does not line up with the "
                    f"batch's token mask {tuple(token_mask.shape)}"
                )
            previous = states[name]
            states[name] = incremental_svd(previous, rows, n_components[name])
            if states[name] is not previous:
                old = None if previous is None else previous.components
                converged[name] = converged_components(
                    old, states[name].components, tau=tau, length=n_components[name]
                )

        return hook

    total = len(batches) if isinstance(batches, Sized) else max_batches
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    handles = [model.get_submodule(name).register_forward_pre_hook(capture(name)) for name in module_names]
    was_training = model.training
    model.eval()
    n_read = 0
    try:
        with torch.no_grad():
            for batch in track(
                islice(batches, max_batches), "EVA", total=total, enabled=progress and total is not None
            ):
                n_read += 1
                updating = {name for name in module_names if not converged[name][: ranks[name]].all()}
                token_mask = _token_mask(batch)
                forward_batch(model, batch)
                if all(state is not None for state in states.values()):
                    ratios = {name: state.explained_variance_ratio for name, state in states.items()}
                    ranks = redistribute_ranks(ratios, rank=rank, rho=rho)
                if all(converged[name][: ranks[name]].all() for name in module_names):
                    break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    if n_read == 0:
        raise WeightkitError("eva: no calibration batches were given")
    unseen = [name for name, state in states.items() if state is None]
    if unseen:
        raise WeightkitError(f"eva: no counted tokens reached {', '.join(unseen)} (all masked out?)")
    unconverged = [name for name in module_names if not converged[name][: ranks[name]].all()]
    if unconverged:
        warnings.warn(
            f"eva: after {n_read} batches the components of {', '.join(unconverged)} have not converged "
            f"(tau={tau}); using the current estimate. More calibration batches would help.",
            stacklevel=2,
        )

    components = {}
    for name, state in states.items():
        a = state.components[: ranks[name]]
        if whiten:
            a = a / state.singular_values[: ranks[name], None].sqrt()
        weight = linears[name].weight
        components[name] = a.to(device=weight.device, dtype=torch.float32)
    return components


def eva_patterns(
    components: Mapping[str, Tensor], *, rank: int, alpha: float, adjust_scaling_factors: bool = True
) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT's ``rank_pattern`` and ``alpha_pattern`` for EVA's redistributed ranks.

    Like PEFT, only layers whose rank (alpha) differs from ``rank`` (``alpha``) are listed, and layers of
    rank 0 are left out (they get no adapter: drop them from the targets). With ``adjust_scaling_factors`` a
    layer of rank ``r_i`` gets ``alpha * r_i / rank``, keeping every layer's scaling at ``alpha / rank``.

    Args:
        components: :func:`eva_components`'s result.
        rank: the configured uniform rank.
        alpha: the configured LoRA alpha.
        adjust_scaling_factors: scale alpha with the rank (PEFT's default).

    Returns:
        ``(rank_pattern, alpha_pattern)`` keyed by module name.
    """
    rank_pattern, alpha_pattern = {}, {}
    for name, a in components.items():
        new_rank = a.shape[0]
        if new_rank == 0:
            continue
        if new_rank != rank:
            rank_pattern[name] = new_rank
            if adjust_scaling_factors:
                alpha_pattern[name] = alpha * new_rank / rank
    return rank_pattern, alpha_pattern
