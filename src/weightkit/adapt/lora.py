"""LoRA: train a low-rank update ``W + (alpha / r) * B @ A`` of frozen linear layers.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685. rsLoRA's
scaling ``alpha / sqrt(r)`` (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", arXiv 2312.03732) is the ``rslora`` option.

Initialisation as in the paper (and PEFT's default): ``A`` Kaiming-uniform, ``B`` zero, so a fresh adapter
leaves the model's outputs unchanged. The wrapped layer keeps PEFT's module names (``base_layer``,
``lora_A.<adapter>``, ``lora_B.<adapter>``), so a model adapted here has PEFT's state-dict keys and the
adapter files round-trip with PEFT unchanged (see :mod:`weightkit.adapt.peft_format`).
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from weightkit.errors import WeightkitError
from weightkit.registry import register
from weightkit.select import select_modules

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "set_active_adapters",
    "merge_and_unload",
    "trainable_parameters",
]


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
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise WeightkitError(f"lora: rank must be an integer >= 1, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise WeightkitError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise WeightkitError("lora: targets is empty; name the modules to adapt")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus named low-rank adapters, summed when active."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        out_features, in_features = self.base_layer.weight.shape
        if config.rank > min(out_features, in_features):
            raise WeightkitError(
                f"lora: rank {config.rank} is larger than a {out_features}x{in_features} layer allows"
            )
        if name in self.lora_A:
            raise WeightkitError(f"lora: this layer already has an adapter named {name!r}")
        weight = self.base_layer.weight
        kwargs = {"bias": False, "device": weight.device, "dtype": weight.dtype}
        self.lora_A[name] = nn.Linear(in_features, config.rank, **kwargs)
        self.lora_B[name] = nn.Linear(config.rank, out_features, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling[name] = config.scaling
        self.active.append(name)

    def delta_weight(self, name: str) -> Tensor:
        """The update ``scaling * B @ A`` this adapter adds to the base weight."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def merge(self) -> None:
        """Add the active adapters' updates into the base weight (inference without extra matmuls)."""
        with torch.no_grad():
            for name in self.active:
                if name not in self.merged:
                    self.base_layer.weight += self.delta_weight(name).to(self.base_layer.weight.dtype)
                    self.merged.append(name)

    def unmerge(self) -> None:
        """Subtract every merged update again, restoring the base weight (up to float rounding)."""
        with torch.no_grad():
            while self.merged:
                name = self.merged.pop()
                self.base_layer.weight -= self.delta_weight(name).to(self.base_layer.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        for name in self.active:
            if name in self.merged:
                continue
            lora_x = self.lora_dropout[name](x).to(self.lora_A[name].weight.dtype)
            out = out + (self.lora_B[name](self.lora_A[name](lora_x)) * self.scaling[name]).to(out.dtype)
        return out


def add_lora(model: nn.Module, config: LoRAConfig, *, name: str = "default") -> nn.Module:
    """Give every targeted ``nn.Linear`` of ``model`` a LoRA adapter ``name``; freeze everything else.

    Calling it again with another ``name`` adds a second adapter to the same layers (several named
    adapters on one model); layers already wrapped keep their wrapper.

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing (with close names), a rank too large for a layer,
            or an adapter name already used.
    """
    selected = select_modules(model, targets=config.targets, ignore=[], types=(nn.Linear, LoRALinear))
    for module_name, layer in selected.items():
        if not isinstance(layer, LoRALinear):
            parent_name, _, child = module_name.rpartition(".")
            layer = LoRALinear(layer)
            setattr(model.get_submodule(parent_name), child, layer)
        layer.add_adapter(name, config)
    for param_name, param in model.named_parameters():
        param.requires_grad = ".lora_A." in param_name or ".lora_B." in param_name
    return model


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Use only the adapters ``names`` in every LoRA layer (``[]`` runs the base model).

    Merged adapters are unmerged first, so switching always acts on the base weights.

    Raises:
        WeightkitError: a name no LoRA layer of the model has.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    known = {n for layer in layers for n in layer.lora_A}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WeightkitError(
            f"no adapter named {', '.join(unknown)}; the model has {', '.join(sorted(known))}"
        )
    for layer in layers:
        layer.unmerge()
        layer.active = [n for n in names if n in layer.lora_A]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights and put the plain ``nn.Linear`` layers back."""
    for module_name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


register("adapt", "lora", LoRAConfig, add_lora)
