"""``adapt(model, config)``: inject adapters into a model's layers; save and load them in PEFT's format.

The config's type picks the method (``LoRAConfig`` -> LoRA, ``BoneConfig`` -> Bone, ...). Several named
adapters can live on one model; :func:`set_active_adapters` chooses which run (``[]``: none);
:func:`merge_adapters` / :func:`unmerge_adapters` fold them into the weights and out again;
:func:`merge_and_unload` folds them in and puts the plain layers back.
"""

from weightkit import _callable_package
from weightkit.adapt.bone import BoneConfig
from weightkit.adapt.increlora import IncreLoRAConfig, IncreLoRAController
from weightkit.adapt.layer import (
    adapt,
    adapter_configs,
    adapter_layers,
    adapter_summary,
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


_callable_package(__name__, adapt)
