"""Parameter-efficient fine-tuning: adapters injected into a model's layers, saved in PEFT's format."""

from weightkit.adapt.lora import LoRAConfig, LoRALinear, add_lora, merge_and_unload, trainable_parameters
from weightkit.adapt.peft_format import load_adapter, save_adapter

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "merge_and_unload",
    "trainable_parameters",
    "save_adapter",
    "load_adapter",
]
