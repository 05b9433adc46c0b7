"""``adapt(model, config)``: inject adapters into a model's layers; save and load them in PEFT's format.

The config's type picks the method (``LoRAConfig`` -> LoRA). Several named adapters can live on one
model; :func:`set_active_adapters` chooses which run, :func:`merge_and_unload` folds them into the weights.
"""

from torch import nn

from weightkit import _callable_package
from weightkit.adapt.lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    merge_and_unload,
    set_active_adapters,
    trainable_parameters,
)
from weightkit.adapt.peft_format import load_adapter, save_adapter
from weightkit.registry import entry_for_config

__all__ = [
    "adapt",
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "set_active_adapters",
    "merge_and_unload",
    "trainable_parameters",
    "save_adapter",
    "load_adapter",
]


def adapt(model: nn.Module, config, *, name: str = "default") -> nn.Module:
    """Add adapter ``name`` of the method ``config`` names to ``model`` (in place) and freeze the rest.

    Args:
        model: any ``torch.nn.Module``; Hugging Face models first of all.
        config: e.g. ``LoRAConfig(rank=8, alpha=16, targets=["re:.*\\.(q_proj|v_proj)"])``.
        name: the adapter's name (several adapters can live on one model).

    Returns:
        ``model``.
    """
    return entry_for_config(config).fn(model, config, name=name)


_callable_package(__name__, adapt)
