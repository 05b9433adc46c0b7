"""``adapt(model, config)``: inject adapters into a model's layers; save and load them in PEFT's format.

The config's type picks the method (``LoRAConfig`` -> LoRA, ``BoneConfig`` -> Bone, ...). Several named
adapters can live on one model; :func:`set_active_adapters` chooses which run (``[]``: none);
:func:`merge_adapters` / :func:`unmerge_adapters` fold them into the weights and out again;
:func:`merge_and_unload` folds them in and puts the plain layers back.
"""

from torch import nn

from weightkit import _callable_package
from weightkit.adapt.bone import BoneConfig
from weightkit.adapt.increlora import IncreLoRAConfig, IncreLoRAController
from weightkit.adapt.layer import (
    adapter_configs,
    adapter_layers,
    adapter_summary,
    check_new_adapter_name,
    merge_adapters,
    merge_and_unload,
    set_active_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from weightkit.adapt.lora import LoRAConfig, LoRALinear, add_lora
from weightkit.adapt.lora_sb import LoRASBConfig
from weightkit.adapt.merged_reader import LoRAMergedReader
from weightkit.adapt.mos import MoSConfig
from weightkit.adapt.peft_format import load_adapter, save_adapter
from weightkit.adapt.subspace import SubspaceConfig
from weightkit.adapt.svfit import SVFitConfig
from weightkit.adapt.trainer import finetune, train_adapter
from weightkit.registry import entry_for_config
from weightkit.runtime.training import TrainConfig

__all__ = [
    "adapt",
    "LoRAConfig",
    "LoRALinear",
    "LoRASBConfig",
    "SVFitConfig",
    "BoneConfig",
    "MoSConfig",
    "IncreLoRAConfig",
    "IncreLoRAController",
    "SubspaceConfig",
    "TrainConfig",
    "train_adapter",
    "finetune",
    "add_lora",
    "set_active_adapters",
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
    "trainable_parameters",
    "adapter_layers",
    "adapter_configs",
    "adapter_summary",
    "save_adapter",
    "load_adapter",
    "LoRAMergedReader",
]


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
    return entry_for_config(config).fn(
        model, config, name=name, data=data, autocast_adapter_dtype=autocast_adapter_dtype
    )


_callable_package(__name__, adapt)
