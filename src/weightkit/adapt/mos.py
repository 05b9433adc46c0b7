"""MoS: LoRA whose low-rank factors are assembled from shards of pools shared across layers.

Paper: Wang et al., "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards",
arXiv 2410.00938 (ICLR 2025); the authors' code is github.com/Forence1999/MoS (``modules/Tied_LoRA.py``).

Every adapted layer computes ``W x + (alpha / r) * B A x`` with ``A`` (``r x in``) and ``B`` (``out x r``) as
in LoRA, but ``A`` and ``B`` are not parameters of the layer. They are assembled from *shards*:

- **global pools**: the layers with the same role and shape (every ``q_proj``, every ``v_proj``) share one
  pool of A-shards and one of B-shards;
- **vector sharding**: a shard is a piece of one rank vector: each row of ``A`` is the concatenation of
  ``l = shards_per_vector`` shards of length ``in / l``, each column of ``B`` of ``l`` shards of length
  ``out / l``;
- **subset selection**: each layer takes a fixed random subset of the pool (an index matrix drawn once from
  ``seed``, without repeats inside a layer); the MoE-like "router" of the paper is this fixed index;
- **pair dissociation**: ``A`` and ``B`` use independently drawn index matrices, so a rank-one pair
  ``(B[:, j], A[j])`` of one layer is not the pair of another layer;
- **shard privatisation**: the last ``private_rank`` rows of ``A`` (columns of ``B``) of each layer are the
  layer's own parameters, shared with no other layer.

The pools are sized as in the authors' code: with ``L`` layers in a group, the shared pool holds
``(budget_rank - private_rank) * L * l`` shards, so a group trains exactly as many numbers as LoRA of rank
``budget_rank`` would, while every layer still computes with rank ``rank`` (``rank / budget_rank`` times
fewer trainable parameters than LoRA of that rank).

Where the tensors live: a group's pools are registered once, in its first layer (``mos_A_pool.<adapter>``,
``mos_B_pool.<adapter>``); the other layers of the group find them through that layer (a plain, unregistered
reference), so ``model.parameters()`` and the state dict hold each pool once and ``model.to(...)`` cannot
separate the copies. The index matrices are persistent integer buffers (``mos_A_index.<adapter>``), saved
with the adapter. Initialisation follows LoRA and the authors' code: A-shards (shared and private) uniform
in ``±1/sqrt(in)`` (LoRA's Kaiming bound for the full row), B-shards zero, so a fresh adapter leaves the
model's outputs unchanged. On 16-bit layers pools and private rows are float32 unless
``autocast_adapter_dtype=False`` (PEFT's adapter precision).

Deliberate deviations from the authors' code:

- a layer's private rows are stored in the layer (``mos_A_private``) instead of as a reserved block at the
  end of the pool; the arithmetic is identical, and the state dict says which numbers are private;
- its "random scaling" vector is left out: the released code fixes it to ones (a no-op);
- the pools are grouped by the module name's last segment *and* the layer's shape (the authors' code
  groups by projection name only, for Llama models where the name implies the shape); random draws use
  one ``torch.Generator`` seeded by ``seed`` instead of the global torch seed.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from weightkit.adapt.layer import (
    AdapterModule,
    BufferDict,
    adapter_dtype,
    finish_adapter,
    is_int,
    merge_deltas,
    unmerge_deltas,
    weight_matrix,
    wrap_targets,
)
from weightkit.errors import WeightkitError
from weightkit.registry import register

__all__ = ["MoSConfig", "MoSLinear", "add_mos", "draw_shard_indices", "assemble_A", "assemble_B"]


@dataclass
class MoSConfig:
    """How large the updates are and how much of them is shared.

    Attributes:
        rank: ``r``, the rank every adapted layer computes with (as LoRA's rank; at most the layer's smaller
            side).
        alpha: the update is scaled by ``alpha / rank``.
        budget_rank: the trainable-parameter budget, in LoRA ranks: each group of layers (same role and
            shape) trains as many numbers as LoRA of rank ``budget_rank`` on those layers. Between
            ``private_rank + 1`` and ``rank``; ``rank / budget_rank`` is the saving over LoRA of rank
            ``rank``.
        private_rank: how many of each layer's ``rank`` rank-one pairs are the layer's own, shared with no
            other layer ("shard privatisation"; 0 shares everything). Less than ``budget_rank``. The other
            ``rank - private_rank`` pairs are drawn from the group's shared pool, which must hold at least
            that many: ``rank - private_rank <= (budget_rank - private_rank) * layers in the group``.
        shards_per_vector: ``l``, into how many shards a row of ``A`` / column of ``B`` is cut ("vector
            sharding"; 1 shares whole vectors). Must divide the in- and out-features of every target.
        dropout: dropout on the adapter's input during training.
        targets: which ``nn.Linear`` (or GPT-2 ``Conv1D``) modules get an adapter: exact module names or
            ``re:`` patterns matched against the full name (default: the attention query and value
            projections of Llama-style and BERT-style models).
        seed: seeds the shard selection and the initial values; the same seed gives the same adapter.
    """

    rank: int = 16
    alpha: float = 16.0
    budget_rank: int = 4
    private_rank: int = 1
    shards_per_vector: int = 2
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "budget_rank", "shards_per_vector"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise WeightkitError(f"mos: {name} must be an integer >= 1, got {value!r}")
        if not is_int(self.private_rank) or self.private_rank < 0:
            raise WeightkitError(f"mos: private_rank must be an integer >= 0, got {self.private_rank!r}")
        # Each suggested fix stays inside the other bounds: private_rank < budget_rank <= rank.
        private, budget, rank = self.private_rank, self.budget_rank, self.rank
        if budget > rank:
            least_rank = max(budget, private + 1)
            fix = f"budget_rank {private + 1}..{rank}" if private < rank else f"rank >= {least_rank}"
            raise WeightkitError(
                f"mos: budget_rank {budget} is larger than rank {rank}; it would train more numbers than "
                f"LoRA of rank {rank}: give {fix}"
            )
        if private >= budget:
            fixes = [f"private_rank 0..{budget - 1}"] + (
                [f"budget_rank {private + 1}..{rank}"] if private < rank else []
            )
            raise WeightkitError(
                f"mos: private_rank {private} must be less than budget_rank {budget}, or nothing is left to "
                f"share (that is plain LoRA of rank budget_rank): give {' or '.join(fixes)}"
            )
        if not 0 <= self.dropout < 1:
            raise WeightkitError(f"mos: dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise WeightkitError("mos: targets is empty; name the modules to adapt")
        if not is_int(self.seed):
            raise WeightkitError(f"mos: seed must be an integer, got {self.seed!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def draw_shard_indices(
    pool_size: int, rows: int, shards_per_vector: int, generator: torch.Generator
) -> Tensor:
    """A layer's index matrix: ``rows * shards_per_vector`` distinct pool shards, drawn at random.

    Returns:
        ``(rows, shards_per_vector)`` int64; row ``j`` lists, in order, the shards that make vector ``j``.
    """
    return torch.randperm(pool_size, generator=generator)[: rows * shards_per_vector].view(rows, -1)


def assemble_A(pool: Tensor, index: Tensor, private: Tensor) -> Tensor:
    """A layer's ``A`` (``rank x in``): rows of concatenated pool shards, then the layer's private rows.

    Args:
        pool: ``(shards, in / l)``, the group's A-shards.
        index: ``(rank - private_rank, l)``, which shards make each shared row.
        private: ``(private_rank, in)``, the layer's own rows.
    """
    shared = pool[index].flatten(1)  # (rows, l, in / l) -> (rows, in): the l shards side by side
    return torch.cat([shared, private], dim=0)


def assemble_B(pool: Tensor, index: Tensor, private: Tensor) -> Tensor:
    """A layer's ``B`` (``out x rank``): columns of concatenated pool shards, then the private columns.

    Args:
        pool: ``(shards, out / l)``, the group's B-shards (each a piece of one column of ``B``).
        index: ``(rank - private_rank, l)``, which shards make each shared column.
        private: ``(out, private_rank)``, the layer's own columns.
    """
    shared = pool[index].flatten(1).T
    return torch.cat([shared, private], dim=1)


class MoSLinear(AdapterModule):
    """A frozen ``nn.Linear`` (or GPT-2's ``Conv1D``) plus named MoS adapters, summed when active.

    The layer holds its index matrices and private rows; its group's pools are held by the group's first
    layer (``pool_owner[adapter]``, possibly the layer itself).
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.mos_A_pool = nn.ParameterDict()  # filled only in the first layer of a group
        self.mos_B_pool = nn.ParameterDict()
        self.mos_A_private = nn.ParameterDict()
        self.mos_B_private = nn.ParameterDict()
        self.mos_A_index = BufferDict()
        self.mos_B_index = BufferDict()
        self.mos_dropout = nn.ModuleDict()
        # A plain dict, so the owner is not registered as a submodule (its pools would be counted twice).
        # Holding the module rather than its parameters keeps the sharing whatever Module.to does to them.
        self.pool_owner: dict[str, MoSLinear] = {}
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(self.mos_A_index)

    def add_pools(
        self, name: str, shards: int, config: MoSConfig, generator: torch.Generator, initialize: bool,
        dtype: torch.dtype,
    ):  # fmt: skip
        """Create the shared pools of adapter ``name`` for this layer's group (``shards`` A- and B-shards,
        in ``dtype``)."""
        out_features, in_features = weight_matrix(self.base_layer).shape
        a_length, b_length = in_features // config.shards_per_vector, out_features // config.shards_per_vector
        a_pool = _uniform((shards, a_length), 1 / math.sqrt(in_features), generator, initialize)
        self.mos_A_pool[name] = nn.Parameter(self._on_device(a_pool, dtype))
        self.mos_B_pool[name] = nn.Parameter(self._on_device(torch.zeros(shards, b_length), dtype))

    def add_adapter(
        self,
        name: str,
        config: MoSConfig,
        *,
        owner: "MoSLinear",
        pool_size: int,
        generator: torch.Generator,
        initialize: bool,
        dtype: torch.dtype,
    ) -> None:
        """Add adapter ``name``: draw this layer's A and B index matrices from the pools ``owner`` holds
        (``pool_size`` shards each) and create its private rows (in ``dtype``, the pools')."""
        out_features, in_features = weight_matrix(self.base_layer).shape
        shared_rank, private_rank = config.rank - config.private_rank, config.private_rank
        index_A = draw_shard_indices(pool_size, shared_rank, config.shards_per_vector, generator)
        index_B = draw_shard_indices(pool_size, shared_rank, config.shards_per_vector, generator)
        private_A = _uniform((private_rank, in_features), 1 / math.sqrt(in_features), generator, initialize)
        self.mos_A_index[name] = index_A.to(self.base_layer.weight.device)
        self.mos_B_index[name] = index_B.to(self.base_layer.weight.device)
        self.mos_A_private[name] = nn.Parameter(self._on_device(private_A, dtype))
        self.mos_B_private[name] = nn.Parameter(
            self._on_device(torch.zeros(out_features, private_rank), dtype)
        )
        self.mos_dropout[name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.pool_owner[name] = owner
        self.scaling[name] = config.scaling
        self.active.append(name)

    def _on_device(self, tensor: Tensor, dtype: torch.dtype) -> Tensor:
        return tensor.to(device=self.base_layer.weight.device, dtype=dtype)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """This layer's ``(A, B)`` of adapter ``name``, assembled from the shared pools and private rows."""
        owner = self.pool_owner[name]
        a = assemble_A(owner.mos_A_pool[name], self.mos_A_index[name], self.mos_A_private[name])
        b = assemble_B(owner.mos_B_pool[name], self.mos_B_index[name], self.mos_B_private[name])
        return a, b

    def delta_weight(self, name: str) -> Tensor:
        """The update ``scaling * B @ A`` this adapter adds to the base weight."""
        a, b = self.factors(name)
        return (b @ a) * self.scaling[name]

    def merge(self) -> None:
        """Add the active adapters' updates into the base weight (inference without extra matmuls)."""
        merge_deltas(self)

    def unmerge(self) -> None:
        """Subtract every merged update again, restoring the base weight (up to float rounding)."""
        unmerge_deltas(self)

    def forward(self, x: Tensor) -> Tensor:
        base_out = self.base_layer(x)
        out = base_out
        for name in self.active:
            if name in self.merged:
                continue
            a, b = self.factors(name)
            mos_x = self.mos_dropout[name](x).to(a.dtype)
            out = out + F.linear(F.linear(mos_x, a), b) * self.scaling[name]
        return out.to(base_out.dtype)  # summed in the adapter's dtype, rounded once


def _uniform(shape: tuple[int, int], bound: float, generator: torch.Generator, initialize: bool) -> Tensor:
    """Uniform in ``±bound`` from ``generator`` (zeros when the values will be loaded instead)."""
    if not initialize:
        return torch.zeros(shape)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def add_mos(
    model: nn.Module, config: MoSConfig, *, name: str = "default", data=None, initialize: bool = True,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:  # fmt: skip
    """Give every targeted ``nn.Linear`` and ``Conv1D`` of ``model`` a MoS adapter ``name``; freeze the rest.

    The targets are grouped by role and shape (the last segment of the module name, e.g. ``q_proj``, and
    ``out x in``); each group gets one pair of shard pools, held by its first layer.

    Args:
        model: the model, changed in place.
        config: the adapter's settings.
        name: the adapter's name (several named adapters can share the layers).
        data: unused (MoS needs no data).
        initialize: ``False`` builds the structure with zero pools, for loading saved tensors next.
        autocast_adapter_dtype: float32 pools and private rows on 16-bit layers (PEFT's default); ``False``
            keeps the layers' dtype.

    Returns:
        ``model``.

    Raises:
        WeightkitError: a target that selects nothing, a layer too small for ``rank`` or not divisible into
            ``shards_per_vector`` shards, a group too small to share ``rank - private_rank`` ranks, or an
            adapter name already used.
    """
    layers = wrap_targets(model, config.targets, MoSLinear)
    groups: dict[tuple[str, int, int], list[MoSLinear]] = {}
    for module_name, layer in layers.items():
        _check_layer(module_name, layer, name, config)
        out_features, in_features = weight_matrix(layer.base_layer).shape
        groups.setdefault((module_name.rpartition(".")[2], out_features, in_features), []).append(layer)
    # Every check before the first change, so a refused config leaves no half-built adapter behind.
    for (role, out_features, in_features), members in groups.items():
        shared_vectors = (config.budget_rank - config.private_rank) * len(members)
        if config.rank - config.private_rank > shared_vectors:
            # Both fixes keep private_rank < budget_rank <= rank: with n >= 1 layers, the smallest budget
            # that fits is at most rank, and the largest rank that fits is at least budget_rank.
            private, count = config.private_rank, len(members)
            least_budget = private + -(-(config.rank - private) // count)
            most_rank = private + (config.budget_rank - private) * count
            raise WeightkitError(
                f"mos: the {count} {role} layer(s) ({out_features}x{in_features}) share a pool of "
                f"{shared_vectors} vectors, but each layer draws rank - private_rank = "
                f"{config.rank - private} distinct ones; give budget_rank {least_budget}..{config.rank}, "
                f"or rank {config.budget_rank}..{most_rank}, or adapt more layers"
            )
    generator = torch.Generator().manual_seed(config.seed)
    for members in groups.values():
        # The shared part of the budget over the whole group, cut into shards (as the authors' code).
        pool_size = (config.budget_rank - config.private_rank) * len(members) * config.shards_per_vector
        owner = members[0]
        # One dtype per group: its layers share the pools (same role and shape; their weights' dtype).
        dtype = adapter_dtype(owner.base_layer.weight.dtype, autocast_adapter_dtype)
        owner.add_pools(name, pool_size, config, generator, initialize, dtype)
        for layer in members:
            layer.add_adapter(
                name, config, owner=owner, pool_size=pool_size, generator=generator, initialize=initialize,
                dtype=dtype,
            )  # fmt: skip
    return finish_adapter(model, name, config)


def _check_layer(module_name: str, layer: MoSLinear, name: str, config: MoSConfig) -> None:
    out_features, in_features = weight_matrix(layer.base_layer).shape
    if name in layer.adapter_names():
        raise WeightkitError(f"mos: {module_name} already has an adapter named {name!r}")
    if config.rank > min(out_features, in_features):
        raise WeightkitError(
            f"mos: rank {config.rank} is larger than the {out_features}x{in_features} layer {module_name} "
            f"allows: give rank <= {min(out_features, in_features)} (and budget_rank <= rank)"
        )
    shards = config.shards_per_vector
    if in_features % shards or out_features % shards:
        common = math.gcd(out_features, in_features)
        fitting = [d for d in range(1, min(common, 16) + 1) if common % d == 0]
        raise WeightkitError(
            f"mos: shards_per_vector {shards} does not divide the {out_features}x{in_features} layer "
            f"{module_name}: give one that divides both sides, e.g. {', '.join(map(str, fitting))}"
        )


register("adapt", "mos", MoSConfig, add_mos)
