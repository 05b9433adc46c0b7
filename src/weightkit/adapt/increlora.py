"""IncreLoRA: start every layer's update at a small rank and give new rank-1 components, during training, to
the layers whose update matters most, until a total rank budget is spent.

Paper: Feiyu Zhang, Liangzhi Li, Junhao Chen, Zhouqiang Jiang, Bowen Wang, Yiming Qian, "IncreLoRA:
Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning", arXiv 2308.12043 (verified).
The paper's body was not available to read here; the details below follow its abstract and the authors'
code (github.com/FeiyuZhang98/IncreLoRA, ``loralib/increlora.py``), which is the reference for this file.

The method:

- **Update as a sum of rank-1 components** (AdaLoRA's SVD-like form): ``delta W = (alpha / r) *
  sum_i b_i * e_i * a_i^T = (alpha / r) * B diag(e) A`` with ``r`` the layer's current (active) rank. ``A``
  and ``B`` start as small Gaussians (std 0.02) and the "singular values" ``e`` at zero, so the first
  ``init_rank`` components leave the model unchanged. As in the authors' code, ``r`` grows with the layer,
  so a layer's existing components are scaled by ``r / (r + k)`` when it gains ``k``. An orthogonality
  penalty ``||A A^T - I||_F + ||B^T B - I||_F`` (averaged over the matrices, times ``orth_reg``) is added
  to the loss by the user (:meth:`IncreLoRAController.regularization`).
- **Importance of a layer**: after every backward pass, ``s = sum(|delta W * dL/d(delta W)|) /
  sqrt(out * in)`` (first-order sensitivity of the whole update matrix), smoothed as in AdaLoRA:
  ``I <- b1 I + (1 - b1) s``, ``U <- b2 U + (1 - b2) |s - I|``, score ``I * U``.
- **Allocation**: after ``warmup`` optimizer steps, every ``interval`` steps the ``top_h`` layers with the
  highest scores get ``rank_step`` more components each, until the total rank of all layers reaches
  ``target_total_rank``.
- **Advance learning**: each layer holds ``rank_step`` *reserve* components beyond its active ones whose
  ``e`` is fixed at 1e-5: they barely change the output, but their ``A`` and ``B`` already train (Adam
  normalises the tiny gradient), so a component starts well-aimed when it is activated (its ``e`` then
  trains from 1e-5). When the budget is spent the reserves are dropped.

How it fits any training loop: the layer pre-allocates every component it may ever get (see ``max_rank``)
as its own small parameter, so **the optimizer never changes**: components not yet in use take no part in
the forward pass, get no gradient (``None``) and are skipped by every ``torch.optim`` optimizer, which
creates their state (Adam's step count, moments) on their first gradient, like a fresh parameter group.
Call :class:`IncreLoRAController`'s ``step()`` once after each ``optimizer.step()``::

    add_increlora(model, IncreLoRAConfig(init_rank=2, target_total_rank=64))
    controller = IncreLoRAController(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for batch in batches:
        loss = model(**batch).loss + controller.regularization()
        loss.backward()
        optimizer.step()
        controller.step()          # True when ranks grew; nothing to do with the optimizer
        optimizer.zero_grad()

The importance is recorded by the layers during ``backward`` (it does not read ``.grad``), so where
``step()`` goes relative to ``zero_grad`` does not matter. While the budget is being handed out, each
backward pass forms ``dL/d(delta W)`` (``out x in``) of one layer at a time for it, as the authors' code
does; once the budget is spent that stops. Under ``DistributedDataParallel`` pass
``find_unused_parameters=True`` (components not yet in use get no gradient); the controller averages
the scores over the processes so they all grow the same layers. The saved adapter holds every component
and each layer's rank counters (``lora_ranknum``), so loading rebuilds the grown ranks. On 16-bit layers
the components are float32 unless ``autocast_adapter_dtype=False`` (PEFT's adapter precision).

Deviations from the authors' code:

- Components are pre-allocated (up to ``max_rank`` per layer) instead of appended during training, so the
  optimizer and a learning-rate scheduler need no change; memory holds the unused components' values
  (not their optimizer state).
- The official code's *restart warmup* (every newly added parameter group gets its own learning-rate
  warm-up and decay) is not applied: it needs the new parameters in a new optimizer group with its own
  schedule, which a fixed optimizer and the user's scheduler do not have. New components train at the
  current learning rate.
- The orthogonality penalty covers all components in use of a layer (``A`` as one matrix, ``B`` as one),
  as AdaLoRA's regulariser does; the official code applies it to each appended parameter separately (so
  added components were only pushed to unit norm, not to be orthogonal to the others).
- Exactly ``top_h`` layers are chosen per allocation (ties go to the earlier layer; the official code takes
  every layer whose score ties the ``top_h``-th), and the last grant is cut so the total never exceeds the
  budget (the official code could overshoot it in the last round when ``rank_step > 1``).
- With gradient accumulation (several backward passes per optimizer step) the importance is the mean of
  the passes' sensitivities (the official code keeps the last one).
- The scale is ``alpha / r`` (the official code divides by ``r + 1e-5``).
"""

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.adapt.layer import (
    AdapterModule,
    adapter_configs,
    adapter_dtype,
    adapter_layers,
    finish_adapter,
    is_int,
    merge_deltas,
    unmerge_deltas,
    weight_matrix,
    wrap_targets,
)
from weightkit.errors import WeightkitError
from weightkit.registry import register

__all__ = [
    "IncreLoRAConfig",
    "IncreLoRALinear",
    "IncreLoRAController",
    "add_increlora",
    "increlora_delta",
    "module_sensitivity",
    "smooth_importance",
    "allocate_ranks",
    "orthogonality_penalty",
    "lora_factors",
]

# The fixed singular value of reserve components (advance learning), as in the authors' code.
RESERVE_VALUE = 1e-5
# The std of the Gaussian initialisation of A and B, as in the authors' code (and AdaLoRA's).
INIT_STD = 0.02


@dataclass
class IncreLoRAConfig:
    """Where the adapters go, how large they start and how the rank budget is handed out.

    Attributes:
        init_rank: components (rank) every layer starts with (>= 1; the paper's ``lora_r``).
        target_total_rank: the budget: the total rank of all adapted layers once allocation ends; at least
            ``init_rank`` times the number of layers. ``None``: twice the starting total.
        rank_step: components a chosen layer receives per allocation (the paper's experiments use half the
            average target rank) and the number of reserve components each layer trains in advance.
        top_h: layers chosen per allocation (those with the highest importance scores).
        interval: optimizer steps between two allocations.
        warmup: optimizer steps before the first allocation (scores are gathered from the start).
        max_rank: the most components one layer can hold; every layer pre-allocates that many (unused ones
            cost their values in memory, no compute and no optimizer state). ``None``: as many as the
            schedule could give one layer (``init_rank`` plus ``rank_step`` per allocation round, at most
            the budget's surplus). Always capped by the layer's smaller side.
        alpha: the update is scaled by ``alpha / r``, ``r`` the layer's current rank.
        beta1: smoothing of the sensitivity (exponential moving average), in (0, 1).
        beta2: smoothing of its uncertainty, in (0, 1).
        orth_reg: weight of the orthogonality penalty :meth:`IncreLoRAController.regularization` returns.
        advance_learning: train each layer's next components in advance with a fixed tiny singular value
            (``False``: new components start untrained, with a zero singular value).
        dropout: dropout on the adapter's input during training.
        targets: which ``nn.Linear`` (or GPT-2 ``Conv1D``) modules get an adapter: exact module names or
            ``re:`` patterns matched against the full name (default: the attention query and value
            projections of Llama-style and BERT-style models).
        seed: seeds the Gaussian initialisation; the same seed gives the same adapter.
    """

    init_rank: int = 2
    target_total_rank: int | None = None
    rank_step: int = 1
    top_h: int = 2
    interval: int = 100
    warmup: int = 100
    max_rank: int | None = None
    alpha: float = 8.0
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1
    advance_learning: bool = True
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])
    seed: int = 0

    def __post_init__(self):
        for name, low in (("init_rank", 1), ("rank_step", 1), ("top_h", 1), ("interval", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise WeightkitError(f"increlora: {name} must be an integer >= {low}, got {value!r}")
        if self.target_total_rank is not None and (
            not is_int(self.target_total_rank) or self.target_total_rank < self.init_rank
        ):
            raise WeightkitError(
                f"increlora: target_total_rank must be an integer >= init_rank ({self.init_rank}) or None, "
                f"got {self.target_total_rank!r}"
            )
        if self.max_rank is not None and (not is_int(self.max_rank) or self.max_rank < self.init_rank):
            raise WeightkitError(
                f"increlora: max_rank must be an integer >= init_rank ({self.init_rank}) or None, "
                f"got {self.max_rank!r}"
            )
        if not self.alpha > 0:
            raise WeightkitError(f"increlora: alpha must be positive, got {self.alpha}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise WeightkitError(f"increlora: {name} must be in (0, 1), got {getattr(self, name)}")
        if not self.orth_reg >= 0:
            raise WeightkitError(f"increlora: orth_reg must be >= 0, got {self.orth_reg}")
        if not 0 <= self.dropout < 1:
            raise WeightkitError(f"increlora: dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise WeightkitError("increlora: targets is empty; name the modules to adapt")
        if not is_int(self.seed):
            raise WeightkitError(f"increlora: seed must be an integer, got {self.seed!r}")


def increlora_delta(a: Tensor, e: Tensor, b: Tensor, scale: float) -> Tensor:
    """The update ``scale * B diag(e) A = scale * sum_i e_i * b_i a_i^T``.

    Args:
        a: ``(k, in)``, one right vector per row.
        e: ``(k,)``, the singular values.
        b: ``(out, k)``, one left vector per column.
        scale: ``alpha / r``.
    """
    return (b @ (e[:, None] * a)) * scale


def module_sensitivity(delta: Tensor, grad: Tensor) -> Tensor:
    """A layer's importance at one step: ``sum(|delta * grad|) / sqrt(delta.numel())``, the first-order
    estimate of the loss change were the whole update removed, normalised by the matrix size.

    Args:
        delta: the layer's update ``delta W`` (``out x in``).
        grad: ``dL / d(delta W)``, same shape.
    """
    return (delta * grad).abs().sum() / math.sqrt(delta.numel())


def smooth_importance(
    sensitivity: Tensor, average: Tensor, uncertainty: Tensor, beta1: float, beta2: float
) -> tuple[Tensor, Tensor]:
    """AdaLoRA's smoothing, elementwise over layers: returns the new ``(average, uncertainty)``; the score
    is their product.

    ``average = beta1 * average + (1 - beta1) * sensitivity``;
    ``uncertainty = beta2 * uncertainty + (1 - beta2) * |sensitivity - average|`` (with the new average).
    """
    average = beta1 * average + (1 - beta1) * sensitivity
    uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - average).abs()
    return average, uncertainty


def allocate_ranks(
    scores: Tensor, ranks: Tensor, capacity: Tensor, *, top_h: int, rank_step: int, budget: int
) -> Tensor:
    """One allocation round: the new ranks of the layers.

    The ``top_h`` layers with room left (``ranks < capacity``) and the highest scores (ties: the earlier
    layer) get ``rank_step`` components each, fewer where the layer's room or the budget's remainder
    (``budget - ranks.sum()``) is smaller, in order of score; the total never exceeds ``budget``.

    Args:
        scores: ``(n,)`` importance scores.
        ranks: ``(n,)`` current ranks (integers).
        capacity: ``(n,)`` the most components each layer can hold.
        top_h: layers chosen.
        rank_step: components per chosen layer.
        budget: the total rank not to exceed.
    """
    room = capacity - ranks
    remaining = max(budget - int(ranks.sum()), 0)
    # Layers without room sort last; a stable sort keeps the earlier layer first on a tie.
    keys = torch.where(room > 0, scores.double(), torch.tensor(-math.inf, dtype=torch.float64))
    order = torch.sort(keys, descending=True, stable=True).indices[:top_h]
    grants = torch.clamp(room[order], max=rank_step).clamp(min=0)
    # Cut the grants where the running total passes the remaining budget.
    overshoot = (torch.cumsum(grants, 0) - remaining).clamp(min=0)
    grants = (grants - overshoot).clamp(min=0)
    new_ranks = ranks.clone()
    new_ranks[order] += grants
    return new_ranks


def orthogonality_penalty(a: Tensor, b: Tensor) -> Tensor:
    """``||A A^T - I||_F + ||B^T B - I||_F``: zero when the rows of ``A`` (``k x in``) and the columns of
    ``B`` (``out x k``) are orthonormal."""
    eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
    return torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)


class _RankCounts(nn.Module):
    """One adapter's rank counters, as persistent buffers so they are saved with the adapter:
    ``active`` components (trainable singular value, counted in the budget) and ``reserve`` components
    after them (trained in advance with a fixed singular value)."""

    def __init__(self, active: int, reserve: int):
        super().__init__()
        self.register_buffer("active", torch.tensor(active))
        self.register_buffer("reserve", torch.tensor(reserve))


class IncreLoRALinear(AdapterModule):
    """A frozen ``nn.Linear`` (or GPT-2's ``Conv1D``) plus named IncreLoRA adapters, summed when active.

    Each adapter's components are separate parameters (``lora_A.<name>.<i>``: ``(in,)``,
    ``lora_E.<name>.<i>``: ``(1,)``, ``lora_B.<name>.<i>``: ``(out,)``), so each gets its own optimizer state
    from its first gradient; only the first ``active + reserve`` take part in the forward pass.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_E = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_ranknum = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.alpha: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        # Adapters whose importance is being recorded (set by IncreLoRAController while it allocates),
        # and the running (sum, count) of their sensitivities since the controller last read them.
        self.tracked: set[str] = set()
        self._sensitivity: dict[str, tuple[Tensor, int]] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(
        self, name: str, config: IncreLoRAConfig, *, capacity: int, reserve: int,
        generator: torch.Generator | None, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        """Add adapter ``name`` holding ``capacity`` components, ``config.init_rank`` of them active, in
        ``dtype`` (default: the base weight's).

        ``generator`` draws ``A`` and ``B`` (std 0.02); ``None`` fills zeros (the tensors are loaded next).
        """
        if name in self.lora_A:
            raise WeightkitError(f"increlora: this layer already has an adapter named {name!r}")
        weight = self.base_layer.weight
        out_features, in_features = weight_matrix(self.base_layer).shape
        if generator is None:
            a, b = torch.zeros(capacity, in_features), torch.zeros(out_features, capacity)
        else:
            a = torch.randn(capacity, in_features, generator=generator) * INIT_STD
            b = torch.randn(out_features, capacity, generator=generator) * INIT_STD
        # Components past the initial ones start at the reserve value, which they keep until activated.
        later = RESERVE_VALUE if config.advance_learning else 0.0
        e = torch.tensor([0.0] * config.init_rank + [later] * (capacity - config.init_rank))
        kwargs = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.lora_A[name] = nn.ParameterList([nn.Parameter(row.to(**kwargs)) for row in a])
        self.lora_E[name] = nn.ParameterList([nn.Parameter(value.reshape(1).to(**kwargs)) for value in e])
        self.lora_B[name] = nn.ParameterList([nn.Parameter(col.to(**kwargs)) for col in b.T])
        self.lora_ranknum[name] = _RankCounts(config.init_rank, reserve).to(weight.device)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.alpha[name] = config.alpha
        self.active.append(name)

    def rank(self, name: str) -> int:
        """The active rank of adapter ``name`` (reserve components not counted)."""
        return int(self.lora_ranknum[name].active)

    def capacity(self, name: str) -> int:
        """The most components adapter ``name`` can hold."""
        return len(self.lora_A[name])

    def set_rank(self, name: str, active: int, reserve: int) -> None:
        """Use ``active`` components (trainable singular values) and ``reserve`` more (trained in advance)."""
        if name in self.merged:
            raise WeightkitError("increlora: unmerge the adapter before changing its rank")
        if not 1 <= active <= active + reserve <= self.capacity(name):
            raise WeightkitError(
                f"increlora: rank {active} + reserve {reserve} does not fit {self.capacity(name)} components"
            )
        counts = self.lora_ranknum[name]
        counts.active.fill_(active)
        counts.reserve.fill_(reserve)

    def factors(self, name: str) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(A, e, B, scale)`` of the ``k`` components in use: ``A`` ``(k, in)``, ``e`` ``(k,)``,
        ``B`` ``(out, k)``.

        The reserve components' singular values are detached: fixed, while their ``A`` and ``B`` train.
        """
        counts = self.lora_ranknum[name]
        active, reserve = int(counts.active), int(counts.reserve)
        used = active + reserve
        a = torch.stack(list(self.lora_A[name])[:used])
        b = torch.stack(list(self.lora_B[name])[:used], dim=1)
        e_params = list(self.lora_E[name])
        e = torch.cat(e_params[:active] + [p.detach() for p in e_params[active:used]])
        return a, e, b, self.alpha[name] / active

    def delta_weight(self, name: str) -> Tensor:
        """The update ``(alpha / r) * B diag(e) A`` this adapter adds to the base weight."""
        return increlora_delta(*self.factors(name))

    def merge(self) -> None:
        """Add the active adapters' updates into the base weight (inference without extra matmuls)."""
        merge_deltas(self)

    def unmerge(self) -> None:
        """Subtract every merged update again, restoring the base weight (up to float rounding)."""
        unmerge_deltas(self)

    def pop_sensitivity(self, name: str) -> Tensor | None:
        """The mean sensitivity recorded since the last call (``None`` if no backward pass ran)."""
        recorded = self._sensitivity.pop(name, None)
        return None if recorded is None else recorded[0] / recorded[1]

    def _record_sensitivity(self, name: str, lora_x: Tensor, grad: Tensor) -> None:
        # The adapter's output is h = delta W x, so dL/d(delta W) = sum over tokens of dL/dh x^T: the same
        # matrix autograd would give an explicit delta W, computed here without keeping it in the graph.
        grad_delta = grad.reshape(-1, grad.shape[-1]).T @ lora_x.reshape(-1, lora_x.shape[-1])
        with torch.no_grad():
            value = module_sensitivity(self.delta_weight(name).float(), grad_delta.float())
        total, count = self._sensitivity.get(name, (0.0, 0))
        self._sensitivity[name] = (total + value, count + 1)

    def forward(self, x: Tensor) -> Tensor:
        base_out = self.base_layer(x)
        out = base_out
        for name in self.active:
            if name in self.merged:
                continue
            a, e, b, scale = self.factors(name)
            lora_x = self.lora_dropout[name](x).to(a.dtype)
            h = F.linear(F.linear(lora_x, e[:, None] * a), b) * scale
            if name in self.tracked and h.requires_grad:
                h.register_hook(partial(self._record_sensitivity, name, lora_x.detach()))
            out = out + h
        return out.to(base_out.dtype)  # summed in the adapter's dtype, rounded once


def lora_factors(layer: IncreLoRALinear, name: str) -> tuple[Tensor, Tensor]:
    """Adapter ``name`` of ``layer`` as plain LoRA factors ``(A, B)`` with ``B @ A == delta W``
    (``A`` ``k x in``, ``B`` ``out x k``, ``k`` the components in use): for export as a LoRA with
    per-module ranks (PEFT's ``rank_pattern``, ``lora_alpha`` equal to each rank)."""
    a, e, b, scale = layer.factors(name)
    return (e[:, None] * a).detach(), (b * scale).detach()


def _budget(config: IncreLoRAConfig, n_layers: int) -> int:
    start = config.init_rank * n_layers
    budget = 2 * start if config.target_total_rank is None else config.target_total_rank
    if budget < start:
        raise WeightkitError(
            f"increlora: target_total_rank {budget} is below the starting total {start} "
            f"({n_layers} layers x init_rank {config.init_rank})"
        )
    return budget


def _layer_limit(config: IncreLoRAConfig, n_layers: int) -> int:
    """The most components one layer may hold: ``max_rank``, or what the schedule could give one layer."""
    if config.max_rank is not None:
        return config.max_rank
    surplus = _budget(config, n_layers) - config.init_rank * n_layers
    rounds = math.ceil(surplus / (min(config.top_h, n_layers) * config.rank_step))
    return config.init_rank + min(surplus, rounds * config.rank_step)


def add_increlora(
    model: nn.Module, config: IncreLoRAConfig, *, name: str = "default", data=None, initialize: bool = True,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:  # fmt: skip
    """Give every targeted ``nn.Linear`` and ``Conv1D`` of ``model`` an IncreLoRA adapter ``name``; freeze the
    rest.

    Train it with an :class:`IncreLoRAController` (its ``step()`` after every optimizer step), which grows
    the ranks. A fresh adapter leaves the outputs unchanged up to the reserve components' 1e-5 singular
    values (exactly, with ``advance_learning=False``).

    Args:
        model: any module with ``nn.Linear`` (or GPT-2 ``Conv1D``) layers.
        config: the settings.
        name: the adapter's name; calling again with another name adds a second adapter.
        data: unused (no data-driven initialisation).
        initialize: ``False`` builds the same structure with zeros, for loading saved tensors next.
        autocast_adapter_dtype: float32 components on 16-bit layers (PEFT's default); ``False`` keeps each
            layer's dtype.

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing, ``init_rank`` larger than a layer allows, a budget
            below the starting total, or an adapter name already used.
    """
    layers = wrap_targets(model, config.targets, IncreLoRALinear)
    budget = _budget(config, len(layers))
    limit = _layer_limit(config, len(layers))
    generator = torch.Generator().manual_seed(config.seed) if initialize else None
    # Reserve components exist only while there is budget left to hand out (and advance learning is on).
    has_reserve = config.advance_learning and budget > config.init_rank * len(layers)
    for module_name, layer in layers.items():
        out_features, in_features = weight_matrix(layer.base_layer).shape
        capacity = min(limit, out_features, in_features)
        if capacity < config.init_rank:
            raise WeightkitError(
                f"increlora: init_rank {config.init_rank} is larger than the {out_features}x{in_features} "
                f"layer {module_name} allows"
            )
        reserve = min(config.rank_step, capacity - config.init_rank) if has_reserve else 0
        dtype = adapter_dtype(layer.base_layer.weight.dtype, autocast_adapter_dtype)
        layer.add_adapter(name, config, capacity=capacity, reserve=reserve, generator=generator, dtype=dtype)
    return finish_adapter(model, name, config)


class IncreLoRAController:
    """Runs IncreLoRA's schedule for adapter ``name`` of ``model``: call :meth:`step` once after every
    ``optimizer.step()``, and add :meth:`regularization` to the loss.

    The optimizer never needs to change (every component is a parameter from the start). The controller's
    own state (step count, smoothed scores) is not saved: a controller made for a loaded, partly grown
    adapter starts a new warm-up and spends what is left of the budget.

    Raises:
        WeightkitError: the model has no IncreLoRA adapter ``name``.
    """

    def __init__(self, model: nn.Module, name: str = "default"):
        config = adapter_configs(model).get(name)
        if not isinstance(config, IncreLoRAConfig):
            raise WeightkitError(f"the model has no IncreLoRA adapter named {name!r}")
        self.config = config
        self.name = name
        self.layers = {
            n: layer
            for n, layer in adapter_layers(model).items()
            if isinstance(layer, IncreLoRALinear) and name in layer.adapter_names()
        }
        self.budget = _budget(config, len(self.layers))
        self.steps = 0
        self.average = torch.zeros(len(self.layers), dtype=torch.float64)
        self.uncertainty = torch.zeros(len(self.layers), dtype=torch.float64)
        self.allocating = self._has_budget_and_room()
        for layer in self.layers.values():
            if self.allocating:
                layer.tracked.add(name)
            else:
                layer.tracked.discard(name)

    def _ranks(self) -> Tensor:
        return torch.tensor([layer.rank(self.name) for layer in self.layers.values()])

    def _capacity(self) -> Tensor:
        return torch.tensor([layer.capacity(self.name) for layer in self.layers.values()])

    def _has_budget_and_room(self) -> bool:
        ranks = self._ranks()
        return int(ranks.sum()) < self.budget and bool((ranks < self._capacity()).any())

    @property
    def total_rank(self) -> int:
        """The total active rank of all layers (at most the budget)."""
        return int(self._ranks().sum())

    @property
    def rank_pattern(self) -> dict[str, int]:
        """``{module name: active rank}``."""
        return {n: layer.rank(self.name) for n, layer in self.layers.items()}

    def regularization(self) -> Tensor:
        """``orth_reg`` times the mean orthogonality penalty of the ``A`` and ``B`` matrices in use; add it
        to the loss before ``backward()``."""
        if self.config.orth_reg == 0:
            return torch.zeros((), device=next(iter(self.layers.values())).base_layer.weight.device)
        penalties = []
        for layer in self.layers.values():
            a, _, b, _ = layer.factors(self.name)
            penalties.append(orthogonality_penalty(a, b))
        return self.config.orth_reg * torch.stack(penalties).sum() / (2 * len(penalties))

    def _sensitivities(self) -> Tensor:
        """This step's sensitivity of each layer (0 where no backward pass ran), averaged over processes."""
        first = next(iter(self.layers.values())).base_layer.weight
        values = []
        for layer in self.layers.values():
            value = layer.pop_sensitivity(self.name)
            values.append(torch.zeros((), device=first.device) if value is None else value.float())
        scores = torch.stack(values)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(scores)
            scores /= torch.distributed.get_world_size()
        return scores.double().cpu()

    def step(self) -> bool:
        """Update the importance scores and, at an allocation step, grow the chosen layers' ranks.

        Returns:
            True when ranks grew at this step (no optimizer change is needed).
        """
        self.steps += 1
        if not self.allocating:
            return False
        config = self.config
        self.average, self.uncertainty = smooth_importance(
            self._sensitivities(), self.average, self.uncertainty, config.beta1, config.beta2
        )
        if self.steps <= config.warmup or self.steps % config.interval:
            return False
        ranks, capacity = self._ranks(), self._capacity()
        new_ranks = allocate_ranks(
            self.average * self.uncertainty, ranks, capacity,
            top_h=config.top_h, rank_step=config.rank_step, budget=self.budget,
        )  # fmt: skip
        self.allocating = int(new_ranks.sum()) < self.budget and bool((new_ranks < capacity).any())
        for layer, rank, cap in zip(self.layers.values(), new_ranks.tolist(), capacity.tolist(), strict=True):
            reserve = min(config.rank_step, cap - rank) if self.allocating and config.advance_learning else 0
            layer.set_rank(self.name, rank, reserve)
            if not self.allocating:
                layer.tracked.discard(self.name)
                layer.pop_sensitivity(self.name)
        return bool((new_ranks > ranks).any())


register("adapt", "increlora", IncreLoRAConfig, add_increlora)
