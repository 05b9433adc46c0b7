"""What every adapter method shares: wrapping target layers, freezing, switching, merging, batches.

An *adapter layer* wraps one frozen layer (``base_layer``) and holds any number of named adapters of one
method. Each adapter's tensors live in ``nn.ModuleDict`` / ``nn.ParameterDict`` entries keyed by the
adapter's name (``lora_A.<name>``, as PEFT does), so one rule finds an adapter's tensors in a state dict:
the key has the adapter's name as one dotted segment (:func:`adapter_state`). Trainable adapter tensors
are parameters; frozen ones (fixed projections, saved singular vectors) are buffers.

Adapter precision (:func:`adapter_dtype`): as PEFT's ``autocast_adapter_dtype=True`` (its default), an
adapter on a float16/bfloat16 (or float8) layer keeps its floating tensors, trained and frozen, in float32;
the forward casts the input to the adapter's dtype, adds the adapter's output to the base output in that
dtype and casts the sum back to the base output's dtype. In bfloat16 an AdamW step of 1e-4 on a weight of
0.05 is below half a unit in the last place and would be lost; float32 keeps it. ``False`` keeps the
layer's own dtype (half the adapter memory, for inference-only adapters).

The methods' layers differ only in their math; this module holds what is common, written once:

- :func:`adapt`: add an adapter of the method its config names (the package's entry point);
- :class:`AdapterModule`: the base class of adapter layers (``weight``/``bias`` read through);
- :class:`AdapterLayer`: the protocol (``base_layer``, ``active``, ``adapter_names``, ``merge``, ``unmerge``);
- :func:`wrap_targets`: wrap the selected modules (already wrapped layers are reused);
- :func:`train_only_adapters`, :func:`set_active_adapters`, :func:`merge_adapters` / :func:`unmerge_adapters`,
  :func:`merge_and_unload`,
  :func:`trainable_parameters`, :func:`adapter_summary`;
- :func:`adapter_configs`: the config each named adapter was made with (for saving);
- :func:`batch_loss`: the loss of one batch of user data (for data-driven initialisations).
"""

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from weightkit.errors import WeightkitError
from weightkit.quantized.linear import OutlierQuantizedLinear, QuantizedLinear, VPTQLinear
from weightkit.quantized.lowrank import LowRankLinear
from weightkit.registry import entry_for_config
from weightkit.runtime.training import forward_batch
from weightkit.select import LINEAR_TYPES, select_modules

__all__ = [
    "adapt",
    "is_int",
    "adapter_dtype",
    "AdapterModule",
    "LINEAR_TYPES",
    "fan_in_fan_out",
    "as_out_in",
    "weight_matrix",
    "AdapterLayer",
    "BufferDict",
    "adapter_layers",
    "adapter_configs",
    "check_new_adapter_name",
    "refuse_unadaptable_layers",
    "adapter_keys",
    "adapter_state",
    "wrap_targets",
    "merge_deltas",
    "unmerge_deltas",
    "finish_adapter",
    "train_only_adapters",
    "set_active_adapters",
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
    "trainable_parameters",
    "adapter_summary",
    "batch_loss",
]

_CONFIGS_ATTR = "weightkit_adapters"


def is_int(value) -> bool:
    """Whether a config value is an integer (``True``/``False`` are not, though Python says they are)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The dtypes PEFT's autocast_adapter_dtype upcasts to float32 (the float8 ones where torch has them).
_UPCAST = {torch.float16, torch.bfloat16} | {
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
}


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of a new adapter's floating tensors on a layer whose weight has ``base_dtype``.

    Args:
        base_dtype: the adapted layer's weight dtype.
        autocast_adapter_dtype: PEFT's option of that name: float16, bfloat16 and float8 become float32
            (other dtypes are kept); ``False`` keeps ``base_dtype``.
    """
    return torch.float32 if autocast_adapter_dtype and base_dtype in _UPCAST else base_dtype


def fan_in_fan_out(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight ``in x out`` (GPT-2's ``Conv1D``), transposed from ``nn.Linear``'s
    ``out x in``; PEFT's name for adapting such a layer."""
    return isinstance(module, Conv1D)


def as_out_in(module: nn.Module, tensor: Tensor) -> Tensor:
    """``tensor``, shaped like ``module``'s weight, as the ``out x in`` matrix ``W`` of ``y = x W^T + b``:
    itself, or its transpose for a :func:`fan_in_fan_out` layer. A view, so in-place changes of the result
    (merging) change ``tensor``, and nothing is copied."""
    return tensor.T if fan_in_fan_out(module) else tensor


def weight_matrix(module: nn.Module) -> Tensor:
    """``module``'s weight as the ``out x in`` matrix (:func:`as_out_in`, a view)."""
    return as_out_in(module, module.weight)


class BufferDict(nn.Module):
    """Frozen tensors keyed by adapter name, as persistent buffers (state-dict key ``<attribute>.<name>``):
    what ``nn.ParameterDict`` is for trained tensors."""

    def __setitem__(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value, persistent=True)

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __iter__(self):
        return iter(self._buffers)


class AdapterModule(nn.Module):
    """The base class of adapter layers: ``weight`` and ``bias`` read the base layer's, as PEFT's layers do.

    Model code reads them on the layers it owns (T5's feed-forward checks ``wo.weight.dtype``, ViT's patch
    embedding ``projection.weight.dtype``); without them an adapted layer fails in the model's forward.
    """

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


@runtime_checkable
class AdapterLayer(Protocol):
    """A frozen ``base_layer`` plus named adapters; ``active`` run in ``forward``, in that order."""

    base_layer: nn.Module
    active: list[str]

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, active or not."""

    def merge(self) -> None:
        """Fold the active adapters into ``base_layer``'s weight (idempotent)."""

    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the base weight up to float rounding."""


def merge_deltas(layer: nn.Module) -> None:
    """``merge`` for methods whose update is additive: ``W += layer.delta_weight(name)`` for each active
    adapter not yet merged (the layer keeps ``active``, ``merged`` and ``delta_weight``, the ``out x in``
    update: it is added to the :func:`weight_matrix` view, so a ``Conv1D``'s ``in x out`` weight gets it
    transposed)."""
    with torch.no_grad():
        weight = weight_matrix(layer.base_layer)
        for name in layer.active:
            if name not in layer.merged:
                weight += layer.delta_weight(name)  # computed in the wider dtype, rounded once
                layer.merged.append(name)


def unmerge_deltas(layer: nn.Module) -> None:
    """Undo :func:`merge_deltas`, newest first (the base weight comes back up to float rounding)."""
    with torch.no_grad():
        weight = weight_matrix(layer.base_layer)
        while layer.merged:
            weight -= layer.delta_weight(layer.merged.pop())


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{module name: adapter layer}`` for every adapter layer of ``model``, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_configs(model: nn.Module) -> dict[str, Any]:
    """``{adapter name: config}`` of the adapters :func:`weightkit.adapt.adapt` put on ``model``
    (a plain dict stored on the model; methods register their adapters here)."""
    if _CONFIGS_ATTR not in model.__dict__:
        model.__dict__[_CONFIGS_ATTR] = {}
    return model.__dict__[_CONFIGS_ATTR]


# Parts of the state-dict keys an adapter's own keys are built from (``<module>.lora_A.<name>.weight``,
# ``<module>.base_layer.weight``); an adapter named like one of them makes keys that cannot be read back.
_KEY_PARTS = {"base_layer", "weight", "bias", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
              "lora_magnitude_vector", "modules_to_save", "original_module"}  # fmt: skip


def adapt(
    model: nn.Module, config, *, name: str = "default", data=None, autocast_adapter_dtype: bool = True
) -> nn.Module:
    """Add adapter ``name`` of the method ``config`` names to ``model`` (in place) and freeze the rest.

    Args:
        model: any ``torch.nn.Module``; Hugging Face models first of all.
        config: e.g. ``LoRAConfig(rank=8, alpha=16, targets=["re:.*\\.(q_proj|v_proj)"])``.
        name: the adapter's name (several adapters can live on one model); a Python identifier.
        data: batches for data-driven initialisations (EVA's activations, LoRA-SB's gradient): an
            iterable of dicts the model takes as keyword arguments (with ``labels`` where a loss is needed).
            They run where the model is (move the model to its device first).
        autocast_adapter_dtype: PEFT's option of that name (``get_peft_model``), and its default: on
            float16/bfloat16 (and float8) layers the adapter's tensors are float32, so small optimizer steps
            are not rounded away; the forward casts inputs to float32 for the adapter and the sum back.
            ``False`` keeps each layer's dtype (half the adapter memory; for adapters that are not trained).

    Returns:
        ``model``.
    """
    check_new_adapter_name(model, name)
    refuse_unadaptable_layers(model)
    return entry_for_config(config).fn(
        model, config, name=name, data=data, autocast_adapter_dtype=autocast_adapter_dtype
    )


def refuse_unadaptable_layers(model: nn.Module) -> None:
    """Refuse a model holding VPTQ, GWQ or low-rank layers (``VPTQLinear``, ``OutlierQuantizedLinear``,
    ``LowRankLinear``, as :func:`weightkit.load` gives for weightkit's own format): no adapter method handles
    them yet, and unhandled they would be skipped silently (they are not ``nn.Linear``, so ``all-linear``
    and patterns would not select them, and subspace methods would train only their bias).

    Raises:
        WeightkitError: naming the first such layer.
    """
    found = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, (VPTQLinear, OutlierQuantizedLinear))),
        None,
    )
    low_rank = next((n for n, m in model.named_modules() if isinstance(m, LowRankLinear)), None)
    if low_rank is not None:
        raise WeightkitError(
            f"{low_rank} is a LowRankLinear layer (weightkit svd/welore factors): adapters do not work over "
            "such layers; train the factors themselves with --method lrc (weightkit.adapt.lrc.finetune_lrc)"
        )
    if found is not None:
        name, layer = found
        raise WeightkitError(
            f"{name} is a {type(layer).__name__} layer (VPTQ or GWQ, weightkit's own quantized format): "
            "adapters do not work over such layers; adapt the full-precision model, or one quantized with "
            "RTN, GPTQ or AWQ (LoRA, rsLoRA and DoRA adapt those)"
        )


def check_new_adapter_name(model: nn.Module, name: str) -> None:
    """Refuse ``name`` for a new adapter of ``model``: not a Python identifier, already used, or a part of
    the model's state-dict keys (a module such as ``model`` or ``mlp``, ``weight``, ``base_layer`` ...).

    PEFT accepts such names and then saves keys that neither PEFT nor weightkit maps back to the right
    tensors (the name is removed from every key on save, and put back after each part equal to it on load).

    Raises:
        WeightkitError: naming the problem.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise WeightkitError(f"an adapter name must be a Python identifier, got {name!r}")
    if name in adapter_configs(model):
        raise WeightkitError(f"the model already has an adapter named {name!r}")
    parts = {part for key in model.state_dict() for part in key.split(".")}
    parts |= {part for module_name, _ in model.named_modules() for part in module_name.split(".")}
    if name in parts | _KEY_PARTS:
        raise WeightkitError(
            f"adapter name {name!r} is also a part of the model's state-dict keys (a module or tensor name): "
            "saved adapters could not be read back; choose another name"
        )


def wrap_targets(
    model: nn.Module,
    targets: list[str],
    wrapper: Callable[[nn.Module], nn.Module],
    *,
    types: tuple[type, ...] = LINEAR_TYPES,
) -> dict[str, nn.Module]:
    """Wrap every module of ``types`` (default: the linear layers, ``nn.Linear`` and GPT-2's ``Conv1D``) that
    ``targets`` select in ``wrapper(module)``; return the wrappers, in model order.

    A module already wrapped by the same wrapper class (a second named adapter) is returned as is.
    Targets that select nothing are an error listing close module names. Children are wrapped before their
    parents, so a selected module inside another selected module ends up inside its parent's wrapper.
    A selected ``QuantizedLinear`` is refused unless ``types`` names that class (LoRA's layer does): most
    methods read or rewrite the dense weight, which a quantized layer keeps frozen on its integer grid.
    """
    wrapper_type = wrapper if isinstance(wrapper, type) else None
    allowed = types + ((wrapper_type,) if wrapper_type else ())
    # Quantized layers are selected too, so that a method that cannot adapt them says so by name instead of
    # "target ... matches no Linear module".
    selected = select_modules(model, targets=targets, ignore=[], types=(*allowed, QuantizedLinear))
    for module_name, module in selected.items():
        if isinstance(module, QuantizedLinear) and QuantizedLinear not in types:
            raise WeightkitError(
                f"{module_name} is a QuantizedLinear layer (int{module.scheme.bits}, of a quantized "
                f"checkpoint): {getattr(wrapper, '__name__', wrapper)} adapters do not work over quantized "
                "layers (LoRA, rsLoRA and DoRA do); train one of those, or adapt the full-precision model"
            )
        if isinstance(module, AdapterLayer) and not (wrapper_type and isinstance(module, wrapper_type)):
            raise WeightkitError(
                f"{module_name} already holds a {type(module).__name__} adapter; one layer takes adapters "
                "of one method"
            )
    wrapped = {}
    for module_name, module in reversed(selected.items()):
        if not isinstance(module, AdapterLayer):
            parent_name, _, child = module_name.rpartition(".")
            module = wrapper(module)
            setattr(model.get_submodule(parent_name), child, module)
        wrapped[module_name] = module
    return {module_name: wrapped[module_name] for module_name in selected}


def finish_adapter(model: nn.Module, name: str, config: Any) -> nn.Module:
    """The last step of every method's ``add_*``: record ``config`` as adapter ``name``'s (for saving),
    leave only adapter parameters trainable, and put new adapter modules in the model's train/eval mode.
    Returns ``model``."""
    adapter_configs(model)[name] = config
    train_only_adapters(model)
    for layer in adapter_layers(model).values():
        # New wrappers and dropout modules start in training mode; follow the mode the model is in.
        layer.train(layer.base_layer.training)
    return model


def train_only_adapters(model: nn.Module) -> None:
    """Freeze every parameter except those of adapters (what an adapter layer holds outside its base)."""
    trainable = set()
    for layer in adapter_layers(model).values():
        base = {id(p) for p in layer.base_layer.parameters()}
        trainable.update(id(p) for p in layer.parameters() if id(p) not in base)
    for param in model.parameters():
        param.requires_grad = id(param) in trainable


def adapter_keys(model: nn.Module, name: str) -> dict[str, str]:
    """``{PEFT key: state-dict key}`` of adapter ``name``'s tensors (parameters and persistent buffers).
    The PEFT key is the state-dict key without the adapter's name segment (``...q_proj.lora_A.weight``)."""
    keys = {}
    for key in model.state_dict(keep_vars=True):
        parts = key.split(".")
        if name in parts:
            parts.remove(name)
            keys[".".join(parts)] = key
    return keys


def adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors keyed as PEFT saves them (see :func:`adapter_keys`)."""
    state = model.state_dict(keep_vars=True)
    return {short: state[full].detach() for short, full in adapter_keys(model, name).items()}


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Use only the adapters ``names`` in every adapter layer (``[]`` runs the base model).

    Merged adapters are unmerged first, so switching always acts on the base weights.

    Raises:
        WeightkitError: a name no adapter layer of the model has.
    """
    layers = list(adapter_layers(model).values())
    known = {n for layer in layers for n in layer.adapter_names()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WeightkitError(
            f"no adapter named {', '.join(unknown)}; the model has {', '.join(sorted(known)) or 'none'}"
        )
    for layer in layers:
        layer.unmerge()
        layer.active = [n for n in names if n in layer.adapter_names()]


def merge_adapters(model: nn.Module) -> None:
    """Fold the active adapters into the base weights, keeping the adapter layers (undo with
    :func:`unmerge_adapters`); the model computes the same function without the adapters' extra work."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again (they come back up to float rounding)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights and put the plain base layers back."""
    for module_name, layer in adapter_layers(model).items():
        layer.merge()
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    adapter_configs(model).clear()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def adapter_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per named adapter of ``model``: ``adapter``, ``method``, ``layers`` (how many it adapts),
    ``parameters`` (its trained numbers; shared tensors such as MoS pools count once), ``trainable`` (how
    many of those require grad now), ``active`` (in at least one layer) and ``merged``."""
    layers = adapter_layers(model).values()
    rows = []
    for name, config in adapter_configs(model).items():
        holding = [layer for layer in layers if name in layer.adapter_names()]
        params = [p for key, p in model.named_parameters() if name in key.split(".")]
        rows.append({
            "adapter": name,
            "method": entry_for_config(config).name,
            "layers": len(holding),
            "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "active": any(name in layer.active for layer in holding),
            "merged": any(name in getattr(layer, "merged", ()) for layer in holding),
        })  # fmt: skip
    return rows


def batch_loss(model: nn.Module, batch) -> Tensor:
    """The loss of one batch: ``model(**batch).loss`` (Hugging Face models given ``labels``)."""
    loss = getattr(forward_batch(model, batch), "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise WeightkitError(
            "this initialisation needs a loss: give batches the model computes one for "
            "(Hugging Face models: include 'labels')"
        )
    return loss
