"""LoRA: train a low-rank update ``W + (alpha / r) * B @ A`` of frozen linear layers.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685. rsLoRA's
scaling ``alpha / sqrt(r)`` (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", arXiv 2312.03732) is the ``rslora`` option.

Initialisation as in the paper (and PEFT's default): ``A`` Kaiming-uniform, ``B`` zero, so a fresh adapter
leaves the model's outputs unchanged. The wrapped layer keeps PEFT's module names (``base_layer``,
``lora_A.<adapter>``, ``lora_B.<adapter>``), so a model adapted here has PEFT's state-dict keys and the
adapter files round-trip with PEFT unchanged (see :mod:`weightkit.adapt.peft_format`).
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from weightkit.adapt.dora import dora_extra_output, dora_merged_weight, dora_unmerged_weight, row_norms
from weightkit.adapt.eva import eva_components
from weightkit.adapt.layer import finish_adapter, wrap_targets
from weightkit.adapt.pissa import principal_factors
from weightkit.errors import WeightkitError
from weightkit.registry import register
from weightkit.select import resolve, select_modules

__all__ = ["LoRAConfig", "LoRALinear", "add_lora"]


@dataclass
class LoRAConfig:
    """Where and how large the low-rank updates are.

    Attributes:
        rank: ``r``, the rank of each update (>= 1, at most the layer's smaller side).
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the adapter's input during training.
        targets: which ``nn.Linear`` modules get an adapter: exact module names or ``re:`` patterns
            matched against the full name (default: the attention query and value projections of
            Llama-style and BERT-style models).
        rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        dora: DoRA (:mod:`weightkit.adapt.dora`): also learn each output feature's magnitude.
        init: how ``A`` and ``B`` start. ``"kaiming"``: ``A`` Kaiming-uniform, ``B`` zero (the paper's and
            PEFT's default; outputs unchanged). ``"pissa"``: the principal singular vectors of the weight,
            the base weight keeps the residual (:mod:`weightkit.adapt.pissa`; outputs unchanged). ``"eva"``:
            ``A`` spans the top principal directions of each layer's inputs on ``data``, ranks redistributed
            by explained variance under the budget ``rank * layers`` (:mod:`weightkit.adapt.eva`; ``B``
            zero); needs calibration batches.
        rank_pattern: per-module ranks overriding ``rank`` (exact names or ``re:`` patterns).
        alpha_pattern: per-module alphas overriding ``alpha``.
        eva_rho: EVA: a layer may get up to ``round(eva_rho * rank)`` (1 keeps every rank uniform).
        eva_tau: EVA: stop reading a layer's inputs once its components' cosine to the previous batch's
            reaches this.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    eva_rho: float = 2.0
    eva_tau: float = 0.99

    def __post_init__(self):
        for where, rank in [("rank", self.rank), *(("rank_pattern", r) for r in self.rank_pattern.values())]:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise WeightkitError(f"lora: {where} ranks must be integers >= 1, got {rank!r}")
        if not 0 <= self.dropout < 1:
            raise WeightkitError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise WeightkitError("lora: targets is empty; name the modules to adapt")
        if self.init not in INITS:
            raise WeightkitError(f"lora: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not self.eva_rho >= 1 or not 0 <= self.eva_tau <= 1:
            raise WeightkitError(
                f"lora: eva_rho must be >= 1 and eva_tau in [0, 1], got {self.eva_rho}, {self.eva_tau}"
            )

    def rank_for(self, module_name: str) -> int:
        rank = resolve(module_name, self.rank_pattern)
        return self.rank if rank is None else rank

    def scaling_for(self, module_name: str) -> float:
        alpha = resolve(module_name, self.alpha_pattern)
        rank = self.rank_for(module_name)
        return (self.alpha if alpha is None else alpha) / (math.sqrt(rank) if self.rslora else rank)


INITS = ("kaiming", "pissa", "eva")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus named low-rank adapters, summed when active."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        # DoRA's per-output-feature magnitudes; PEFT saves them as "<module>.lora_magnitude_vector".
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._merged_norms: dict[str, Tensor] = {}  # DoRA row norms at merge time, to unmerge exactly
        # PiSSA's initial (A, B): saving expresses the update against the original base weight with them.
        self.pissa_initial: dict[str, tuple[Tensor, Tensor]] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(
        self, name: str, *, rank: int, scaling: float, dropout: float = 0.0, dora: bool = False,
        init: str = "kaiming",
    ) -> None:  # fmt: skip
        """Add adapter ``name`` (active). ``init="pissa"`` also replaces the base weight by its residual."""
        out_features, in_features = self.base_layer.weight.shape
        if rank > min(out_features, in_features):
            raise WeightkitError(
                f"lora: rank {rank} is larger than a {out_features}x{in_features} layer allows"
            )
        if name in self.lora_A:
            raise WeightkitError(f"lora: this layer already has an adapter named {name!r}")
        weight = self.base_layer.weight
        kwargs = {"bias": False, "device": weight.device, "dtype": weight.dtype}
        self.lora_A[name] = nn.Linear(in_features, rank, **kwargs)
        self.lora_B[name] = nn.Linear(rank, out_features, **kwargs)
        with torch.no_grad():
            if init == "pissa":
                a, b, residual = principal_factors(weight, rank, scaling)
                self.lora_A[name].weight.copy_(a)
                self.lora_B[name].weight.copy_(b)
                weight.copy_(residual)
                self.pissa_initial[name] = (a.clone(), b.clone())
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling[name] = scaling
        if dora:
            with torch.no_grad():
                norms = row_norms(weight.float(), self._lora_delta(name).float())
            self.lora_magnitude_vector[name] = nn.Parameter(norms.to(weight.dtype))
        self.active.append(name)

    def _lora_delta(self, name: str) -> Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def delta_weight(self, name: str) -> Tensor:
        """The update adapter ``name`` adds to the current base weight (DoRA's depends on that weight)."""
        delta = self._lora_delta(name)
        if name not in self.lora_magnitude_vector:
            return delta
        weight = self.base_layer.weight
        merged, _ = dora_merged_weight(weight, delta, self.lora_magnitude_vector[name])
        return merged - weight

    def merge(self) -> None:
        """Fold the active adapters into the base weight (inference without extra matmuls)."""
        with torch.no_grad():
            weight = self.base_layer.weight
            for name in self.active:
                if name in self.merged:
                    continue
                delta = self._lora_delta(name).to(weight.dtype)
                if name in self.lora_magnitude_vector:
                    magnitude = self.lora_magnitude_vector[name]
                    merged, self._merged_norms[name] = dora_merged_weight(weight, delta, magnitude)
                    weight.copy_(merged)
                else:
                    weight += delta
                self.merged.append(name)

    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the base weight (up to float rounding)."""
        with torch.no_grad():
            weight = self.base_layer.weight
            while self.merged:
                name = self.merged.pop()
                delta = self._lora_delta(name).to(weight.dtype)
                if name in self.lora_magnitude_vector:
                    magnitude = self.lora_magnitude_vector[name]
                    weight.copy_(dora_unmerged_weight(weight, delta, magnitude, self._merged_norms.pop(name)))
                else:
                    weight -= delta

    def forward(self, x: Tensor) -> Tensor:
        base_out = self.base_layer(x)
        out = base_out
        for name in self.active:
            if name in self.merged:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            lora_x = self.lora_dropout[name](x).to(lora_A.weight.dtype)
            lora_out = lora_B(lora_A(lora_x)) * self.scaling[name]
            if name in self.lora_magnitude_vector:
                lora_out = self._dora_output(name, x, lora_x, base_out, lora_out)
            out = out + lora_out.to(out.dtype)
        return out

    def _dora_output(
        self, name: str, x: Tensor, lora_x: Tensor, base_out: Tensor, lora_out: Tensor
    ) -> Tensor:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if lora_x is x:  # no dropout: the base output without its bias is x W^T
            plain = base_out if bias is None else base_out - bias
        else:  # DoRA scales the dropped-out input's base output, as the paper and PEFT do
            plain = nn.functional.linear(lora_x, weight.to(lora_x.dtype))
        magnitude = self.lora_magnitude_vector[name]
        return dora_extra_output(
            plain.to(lora_out.dtype), lora_out, magnitude, weight, self._lora_delta(name)
        )


def add_lora(
    model: nn.Module, config: LoRAConfig, *, name: str = "default", data=None, initialize: bool = True
) -> nn.Module:
    """Give every targeted ``nn.Linear`` of ``model`` a LoRA adapter ``name``; freeze everything else.

    Calling it again with another ``name`` adds a second adapter to the same layers (several named
    adapters on one model); layers already wrapped keep their wrapper.

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing (with close names), a rank too large for a layer,
            or an adapter name already used.
    """
    init = config.init if initialize else "kaiming"
    eva_a = {}
    if init == "eva":
        # EVA decides each layer's rank from its inputs first; layers given rank 0 get no adapter.
        eva_a = _eva_init(model, config, data)
        config = dataclasses.replace(config, targets=sorted(eva_a))
    for module_name, layer in wrap_targets(model, config.targets, LoRALinear).items():
        rank, scaling = config.rank_for(module_name), config.scaling_for(module_name)
        if module_name in eva_a:
            rank, alpha = (
                eva_a[module_name].shape[0],
                resolve(module_name, config.alpha_pattern) or config.alpha,
            )
            scaling = alpha * rank / config.rank / (math.sqrt(rank) if config.rslora else rank)
        layer.add_adapter(
            name, rank=rank, scaling=scaling, dropout=config.dropout, dora=config.dora,
            init="kaiming" if init == "eva" else init,
        )  # fmt: skip
        if module_name in eva_a:
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(eva_a[module_name])
    return finish_adapter(model, name, config)


def _eva_init(model: nn.Module, config: LoRAConfig, data) -> dict[str, Tensor]:
    """EVA's ``A`` per targeted module (rank 0 modules left out)."""
    if data is None:
        raise WeightkitError("lora: init='eva' needs calibration batches: adapt(model, config, data=batches)")
    modules = select_modules(model, targets=config.targets, ignore=[], types=(nn.Linear, LoRALinear))
    components = eva_components(
        model, list(modules), data, rank=config.rank, rho=config.eva_rho, tau=config.eva_tau
    )
    return {n: a for n, a in components.items() if a.shape[0] > 0}


# One core, named presets: "--method eva" is LoRA initialised by EVA, "dora" is LoRA with DoRA ...
register("adapt", "lora", LoRAConfig, add_lora, preset={"init": "kaiming", "dora": False})
register("adapt", "dora", LoRAConfig, add_lora, preset={"init": "kaiming", "dora": True})
register("adapt", "pissa", LoRAConfig, add_lora, preset={"init": "pissa", "dora": False})
register("adapt", "eva", LoRAConfig, add_lora, preset={"init": "eva", "dora": False})
