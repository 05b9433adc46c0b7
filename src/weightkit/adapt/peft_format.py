"""Adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores a LoRA adapter's tensors as ``base_model.model.<module>.lora_A.weight`` (the adapter's name
dropped) and its settings in ``adapter_config.json``; ``peft.PeftModel.from_pretrained`` and vLLM load
exactly that. :func:`save_adapter` writes it from a model adapted by :func:`weightkit.adapt.add_lora`, and
:func:`load_adapter` reads an adapter PEFT (or weightkit) saved into a plain model.
"""

import json
from pathlib import Path

import torch
from torch import nn

from weightkit.adapt.lora import LoRAConfig, LoRALinear, add_lora
from weightkit.checkpoint import CheckpointReader, CheckpointWriter
from weightkit.errors import WeightkitError

__all__ = ["save_adapter", "load_adapter"]

_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"


def _lora_layers(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and name in m.lora_A}
    if not layers:
        raise WeightkitError(f"the model has no LoRA adapter named {name!r}")
    return layers


def save_adapter(
    model: nn.Module, out_dir: str | Path, *, name: str = "default", base_model: str | None = None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write adapter ``name`` of ``model`` in PEFT's format (atomically).

    Args:
        model: a model adapted with :func:`weightkit.adapt.add_lora`.
        out_dir: the adapter directory to create.
        name: which adapter.
        base_model: ``base_model_name_or_path`` recorded in the config (default: the model's own
            ``config.name_or_path`` when it has one).
        overwrite: replace an existing ``out_dir``.
    """
    layers = _lora_layers(model, name)
    first = next(iter(layers.values()))
    rank = first.lora_A[name].weight.shape[0]
    alpha = first.scaling[name] * rank  # scaling = alpha / r
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or []
    with CheckpointWriter(
        out_dir, overwrite=overwrite, weights_name=_WEIGHTS, max_shard_bytes=2**62
    ) as writer:
        for module_name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part)[name].weight.detach().contiguous()
                writer.add(f"{_PREFIX}{module_name}.{part}.weight", weight.cpu().clone())
        writer.write_json(
            "adapter_config.json",
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in architectures) else None,
                "base_model_name_or_path": base_model or getattr(config, "name_or_path", None),
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "use_rslora": False,
                "target_modules": sorted(layers),
                "bias": "none",
                "fan_in_fan_out": False,
                "inference_mode": True,
            },
        )
    return Path(out_dir)


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, name: str = "default") -> nn.Module:
    """Add the LoRA adapter saved in ``adapter_dir`` (PEFT's format) to ``model`` as adapter ``name``.

    Raises:
        WeightkitError: not a LoRA adapter, an adapter for modules the model does not have, or tensors
            whose shapes do not fit the model's layers.
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise WeightkitError(f"{adapter_dir} has no adapter_config.json; it is not a PEFT adapter")
    saved = json.loads(config_file.read_text())
    if saved.get("peft_type") != "LORA" or saved.get("use_dora") or saved.get("rank_pattern"):
        raise WeightkitError(f"{adapter_dir}: only plain LoRA adapters (one rank) are supported so far")
    with CheckpointReader(adapter_dir / _WEIGHTS) as reader:
        tensors = {n.removeprefix(_PREFIX): reader.get(n) for n in reader.names()}
    modules = sorted({n.rsplit(".lora_", 1)[0] for n in tensors})
    rank = int(saved["r"])
    config = LoRAConfig(
        rank=rank, alpha=float(saved["lora_alpha"]), targets=modules, rslora=bool(saved.get("use_rslora"))
    )
    add_lora(model, config, name=name)
    layers = _lora_layers(model, name)
    with torch.no_grad():
        for module_name in modules:
            for part in ("lora_A", "lora_B"):
                target = getattr(layers[module_name], part)[name].weight
                value = tensors[f"{module_name}.{part}.weight"]
                if value.shape != target.shape:
                    raise WeightkitError(
                        f"{adapter_dir}: {module_name}.{part} has shape {tuple(value.shape)}, the model's "
                        f"layer needs {tuple(target.shape)}; the adapter was made for another model"
                    )
                target.copy_(value)
    return model
