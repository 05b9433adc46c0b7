"""Adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores an adapter's tensors under the model's key with the adapter's name dropped and
``base_model.model.`` in front (``base_model.model.<module>.lora_A.weight``) and its settings in
``adapter_config.json``; ``peft.PeftModel.from_pretrained`` and vLLM load exactly that.

- LoRA (with DoRA, rsLoRA, per-module ranks from EVA, PiSSA; on linear, embedding and conv layers) saves
  as PEFT's ``LORA`` (an embedding's factors as ``<module>.lora_embedding_A`` / ``lora_embedding_B``;
  ``fan_in_fan_out: true`` when a layer is GPT-2's ``Conv1D``, whose weight is stored ``in x out``). A
  PiSSA adapter moved the base weights, so it is saved as PEFT saves one for the *original* base model: the
  update ``B A - B0 A0`` as a LoRA of twice the rank.
- A method whose config defines ``peft_config(target_modules)`` and ``from_peft(saved)`` (Bone -> PEFT's
  MiSS) saves as that PEFT type.
- Every other (weightkit-only) method saves in the same layout with its own ``peft_type`` (the method's
  registered name in capitals) and its config fields; weightkit loads it back.

Tensors are saved in the dtype they have, as PEFT's ``save_pretrained`` does: float32 for an adapter on a
16-bit model made with the default ``autocast_adapter_dtype=True`` (PEFT's default too), the model's dtype
with ``False``. Loading follows ``PeftModel.from_pretrained``: the adapter gets the dtype its layers call for
(:func:`weightkit.adapt.layer.adapter_dtype`), whatever dtype it was saved in.
"""

import dataclasses
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from weightkit.adapt.layer import (
    adapter_configs,
    adapter_keys,
    adapter_layers,
    adapter_state,
    check_new_adapter_name,
    fan_in_fan_out,
    refuse_unadaptable_layers,
)
from weightkit.adapt.lora import LORA_LAYERS, LoRAConfig, LoRAEmbedding, LoRALinear
from weightkit.adapt.pissa import pissa_to_lora
from weightkit.checkpoint import CheckpointReader, CheckpointWriter, Provenance
from weightkit.checkpoint.files import PEFT_ADAPTER_WEIGHTS, PEFT_KEY_PREFIX, read_adapter_config
from weightkit.errors import WeightkitError
from weightkit.quantized.linear import QuantizedLinear
from weightkit.registry import entry_for_config, lookup, names
from weightkit.select import suffix_pattern_value

__all__ = [
    "save_adapter",
    "load_adapter",
    "load_base",
    "lora_config_from_peft",
    "check_lora_ranks",
    "LABELS_FILE",
]

# A classifier's label names, by class id (a JSON list), beside its SEQ_CLS adapter. Not in a config.json:
# transformers takes a directory with one for a complete model and then finds no weights in it.
LABELS_FILE = "labels.json"

# PEFT also saves the whole table of an embedding it adapts (``save_embedding_layers``, for resized
# vocabularies) under this suffix; loading puts it into the embedding, as PEFT does.
_EMBEDDING_TABLE = ".base_layer.weight"


def save_adapter(
    model: nn.Module, out_dir: str | Path, *, name: str = "default", base_model: str | None = None,
    modules_to_save: list[str] = (), extra_json: dict[str, Any] | None = None,
    extra_tensors: dict[str, dict[str, Tensor]] | None = None, overwrite: bool = False,
    provenance: Provenance | None = None,
) -> Path:  # fmt: skip
    """Write adapter ``name`` of ``model`` in PEFT's format (atomically).

    Args:
        model: a model adapted with :func:`weightkit.adapt.adapt`.
        out_dir: the adapter directory to create.
        name: which adapter.
        base_model: ``base_model_name_or_path`` recorded in the config (default: the model's own
            ``config.name_or_path`` when it has one).
        modules_to_save: modules trained in full alongside the adapter (a new classification head), saved
            whole as PEFT's ``modules_to_save``.
        extra_json: more files for the directory, ``{file name: JSON value}`` (a classifier's
            ``labels.json``), written with the adapter before the directory is published.
        extra_tensors: more safetensors files for the directory, ``{file name: {name: tensor}}`` (a training
            checkpoint's optimizer state), written likewise.
        overwrite: replace an existing ``out_dir``.
        provenance: what made the adapter, for the directory's integrity manifest (``weightkit adapt``
            gives it; None writes no manifest, as for an adapter saved from a model built in Python).
    """
    configs = adapter_configs(model)
    if name not in configs:
        raise WeightkitError(
            f"the model has no adapter named {name!r} (it has: {', '.join(configs) or 'none'})"
        )
    extra_json, extra_tensors = dict(extra_json or {}), dict(extra_tensors or {})
    taken = {"adapter_config.json", PEFT_ADAPTER_WEIGHTS} & (set(extra_json) | set(extra_tensors))
    if taken:
        raise WeightkitError(f"extra files cannot replace the adapter's own {', '.join(sorted(taken))}")
    config = configs[name]
    targets = sorted(n for n, layer in adapter_layers(model).items() if name in layer.adapter_names())
    if isinstance(config, LoRAConfig):
        settings, tensors = _lora_to_peft(model, config, name)
    elif hasattr(config, "peft_config"):
        settings, tensors = config.peft_config(targets), adapter_state(model, name)
    else:
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "targets"}
        settings = {"peft_type": entry_for_config(config).name.upper(), **fields}
        tensors = adapter_state(model, name)
    hf_config = getattr(model, "config", None)
    settings = {
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model or getattr(hf_config, "name_or_path", None),
        "target_modules": targets,
        "inference_mode": True,
        **settings,
        "modules_to_save": list(modules_to_save) or None,
    }
    for module_name in modules_to_save:
        for key, tensor in model.get_submodule(module_name).state_dict().items():
            tensors[f"{module_name}.{key}"] = tensor
    with CheckpointWriter(
        out_dir, overwrite=overwrite, weights_name=PEFT_ADAPTER_WEIGHTS, max_shard_bytes=2**62,
        provenance=provenance,
    ) as writer:  # fmt: skip
        for key, tensor in tensors.items():
            writer.add(PEFT_KEY_PREFIX + key, tensor.detach().cpu().contiguous().clone())
        writer.write_json("adapter_config.json", settings)
        for file_name, value in extra_json.items():
            writer.write_json(file_name, value)
        for file_name, file_tensors in extra_tensors.items():
            contiguous = {key: t.detach().cpu().contiguous() for key, t in file_tensors.items()}
            save_file(contiguous, writer.path / file_name)
    return Path(out_dir)


def _task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: ``SEQ_CLS`` for a sequence classifier (so that PEFT's
    ``AutoPeftModelForSequenceClassification`` loads it), ``CAUSAL_LM`` for a model saved as a causal LM."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    architectures = getattr(getattr(model, "config", None), "architectures", None) or []
    return "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in architectures) else None


def _lora_to_peft(model: nn.Module, config: LoRAConfig, name: str) -> tuple[dict, dict[str, Tensor]]:
    """PEFT's LORA settings and tensors; per-module ranks and alphas become rank/alpha patterns."""
    tensors, ranks, alphas = {}, {}, {}
    transposed = False  # a Conv1D among the layers (PEFT loads each layer in its own layout whatever it says)
    lora_layers = tuple(LORA_LAYERS.values())
    for module_name, layer in adapter_layers(model).items():
        if not isinstance(layer, lora_layers) or name not in layer.adapter_names():
            continue
        transposed |= fan_in_fan_out(layer.base_layer)
        if isinstance(layer, LoRAEmbedding):  # PEFT keeps an embedding's factors as bare parameters
            a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
            tensors[f"{module_name}.lora_embedding_A"] = a
            tensors[f"{module_name}.lora_embedding_B"] = b
        else:  # linear and conv layers: the factors are layers
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            if isinstance(layer, LoRALinear) and name in layer.pissa_initial:
                a, b = pissa_to_lora(a, b, *layer.pissa_initial[name])
            tensors[f"{module_name}.lora_A.weight"] = a
            tensors[f"{module_name}.lora_B.weight"] = b
            if layer.lora_B[name].bias is not None:  # lora_bias
                tensors[f"{module_name}.lora_B.bias"] = layer.lora_B[name].bias
        if name in layer.lora_magnitude_vector:
            tensors[f"{module_name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
        rank = a.shape[0]
        ranks[module_name] = rank
        alphas[module_name] = layer.scaling[name] * (rank**0.5 if config.rslora else rank)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    settings = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        # PEFT reads pattern keys as regexes matched against the end of a module's name: escape the names.
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "lora_bias": config.lora_bias,
        "bias": "none",
        "fan_in_fan_out": transposed,
    }
    return settings, tensors


# Every field of PEFT 0.21's LoraConfig is read, has no effect on loading, or is refused by name unless it
# holds its "off" value: an adapter never loads as something else than what PEFT would run.
_LORA_READ = {
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_dropout",
    "target_modules", "modules_to_save", "init_lora_weights", "exclude_modules", "bias", "lora_bias",
    "fan_in_fan_out",
}  # fmt: skip
# Bookkeeping, or choices whose effect is already in the saved tensors (which modules were adapted, how
# they were initialised when the base is left as it is).
_LORA_NO_EFFECT = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "layers_to_transform", "layers_pattern", "megatron_core",
    "runtime_config", "qalora_group_size", "eva_config", "corda_config", "lora_ga_config",
}  # fmt: skip
# Initialisations that leave the base weights alone: after training, only the saved tensors matter.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Initialisations whose residual base PEFT re-derives from the base weights on load, deterministically;
# weightkit does the same (the randomised "pissa_niter_<k>" draws from PEFT's global RNG: not reproducible).
_REDERIVED_INITS = ("pissa", "olora")


def _off(value) -> bool:
    return value in (None, False, "none", "", 0) or value == {} or value == []


def _refuse_unsupported_lora_fields(saved: dict, where: Path) -> None:
    """Refuse a LoRA adapter_config.json field weightkit would otherwise not honour, naming it."""
    init = saved.get("init_lora_weights", True)
    if init not in _PLAIN_INITS + _REDERIVED_INITS:
        raise WeightkitError(
            f"{where}: init_lora_weights={init!r}: PEFT re-derives the base weights from this adapter on "
            "load (the residual of a randomised-SVD PiSSA or a CorDA/LoftQ/LoRA-GA initialisation), which "
            "weightkit does not do; save it converted (PEFT's path_initial_model_for_weight_conversion) to "
            "load it here"
        )
    if saved.get("bias", "none") not in ("none", "all", "lora_only"):
        raise WeightkitError(
            f"{where}: bias={saved['bias']!r} is not one of PEFT's 'none', 'all', 'lora_only'"
        )
    refused = sorted(
        key for key, value in saved.items() if key not in _LORA_READ | _LORA_NO_EFFECT and not _off(value)
    )
    if refused:
        settings = ", ".join(f"{key}={saved[key]!r}" for key in refused)
        raise WeightkitError(f"{where}: LoRA adapters with {settings} are not supported by weightkit")


def lora_config_from_peft(saved: dict, modules: list[str], where: Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT LoRA ``adapter_config.json`` (``saved``) on ``modules``: each
    module's rank and alpha as PEFT resolves them; a field weightkit does not honour is refused by name."""
    _refuse_unsupported_lora_fields(saved, where)
    rank, alpha = int(saved["r"]), float(saved["lora_alpha"])
    rank_pattern, alpha_pattern = {}, {}
    for module_name in modules:
        module_rank = suffix_pattern_value(module_name, saved.get("rank_pattern") or {})
        module_alpha = suffix_pattern_value(module_name, saved.get("alpha_pattern") or {})
        exact = "re:" + re.escape(module_name)
        if module_rank is not None:
            rank_pattern[exact] = int(module_rank)
        if module_alpha is not None:
            alpha_pattern[exact] = float(module_alpha)
    return LoRAConfig(
        rank=rank,
        alpha=alpha,
        targets=modules,
        rslora=bool(saved.get("use_rslora")),
        dora=bool(saved.get("use_dora")),
        dropout=float(saved.get("lora_dropout") or 0.0),
        lora_bias=bool(saved.get("lora_bias")),
        init=saved["init_lora_weights"] if saved.get("init_lora_weights") in _REDERIVED_INITS else "kaiming",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def check_lora_ranks(config: LoRAConfig, tensors: dict[str, Tensor], where: Path) -> None:
    """Refuse LoRA factors whose rank is not the one ``config`` gives their module (its ``r`` or
    ``rank_pattern``): the scaling ``alpha / r`` would be that of another adapter. ``tensors`` are keyed
    ``MODULE.lora_A.weight`` / ``MODULE.lora_embedding_A`` (a ``[r, ...]`` factor) among others."""
    for key, tensor in tensors.items():
        for suffix in (".lora_A.weight", ".lora_embedding_A"):
            if not key.endswith(suffix):
                continue
            rank = config.rank_for(key.removesuffix(suffix))
            if tensor.dim() == 0 or tensor.shape[0] != rank:
                raise WeightkitError(
                    f"{where}: {key} has shape {tuple(tensor.shape)}, not rank {rank} as adapter_config.json "
                    "says (r, rank_pattern)"
                )


# What save_adapter writes for every adapter besides the method's own config fields.
_SAVED_WITH_EVERY_ADAPTER = {
    "peft_type", "task_type", "base_model_name_or_path", "target_modules", "inference_mode",
    "modules_to_save",
}  # fmt: skip


def _config_from_saved(saved: dict, modules: list[str], where: Path):
    peft_type = str(saved.get("peft_type"))
    if peft_type == "LORA":
        return lora_config_from_peft(saved, modules, where)
    for method in names("adapt"):
        entry = lookup("adapt", method)
        from_peft = getattr(entry.config_cls, "from_peft", None)
        if from_peft is not None and peft_type in getattr(entry.config_cls, "PEFT_TYPES", ()):
            return dataclasses.replace(from_peft(saved), targets=modules)
        if peft_type == method.upper():
            fields = {f.name for f in dataclasses.fields(entry.config_cls)}
            unknown = sorted(set(saved) - fields - _SAVED_WITH_EVERY_ADAPTER)
            if unknown:  # from a newer weightkit, or edited: never load as something else than it was saved
                raise WeightkitError(
                    f"{where}: {peft_type} adapters have no setting {', '.join(unknown)} in this weightkit"
                )
            values = {k: v for k, v in saved.items() if k in fields}
            return entry.config_cls(**{**values, "targets": modules})
    raise WeightkitError(f"{where}: adapters of type {peft_type} are not supported by weightkit")


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, *, name: str = "default", autocast_adapter_dtype: bool = True
) -> nn.Module:
    """Add the adapter saved in ``adapter_dir`` (PEFT's format, by weightkit or PEFT) as adapter ``name``.

    ``autocast_adapter_dtype`` as in PEFT's ``PeftModel.from_pretrained``: on 16-bit layers the adapter's
    tensors are float32 whatever dtype they were saved in; ``False`` gives them the layers' dtype (saved
    float32 values are rounded to it).

    As PEFT's ``PeftModel.load_adapter``, an adapter loaded into a model that already has one is *not*
    made active: the model keeps computing with the adapters that were active;
    :func:`~weightkit.adapt.set_active_adapters` switches.

    Raises:
        WeightkitError: an adapter type weightkit does not know, an adapter for modules the model does not
            have, or tensors whose shapes do not fit the model's layers.
    """
    adapter_dir = Path(adapter_dir)
    check_new_adapter_name(model, name)
    refuse_unadaptable_layers(model)
    keep_inactive = bool(adapter_configs(model))
    saved = read_adapter_config(adapter_dir)
    with CheckpointReader(adapter_dir / PEFT_ADAPTER_WEIGHTS) as reader:
        tensors = {n.removeprefix(PEFT_KEY_PREFIX): reader.get(n) for n in reader.names()}
    head = _take_modules_to_save(model, saved.get("modules_to_save") or [], tensors, adapter_dir)
    biases = _take_biases(tensors) if saved.get("bias", "none") != "none" else {}
    module_names = set(adapter_layers(model))
    # The adapted modules: the longest key prefix that names a module of the model (or a saved target).
    targets = saved.get("target_modules")
    modules = sorted(
        {_owning_module(key, model, module_names) for key in tensors if not key.endswith(_EMBEDDING_TABLE)}
    )
    if isinstance(targets, list):
        targets = [t for t in targets if not _excluded(t, saved.get("exclude_modules"))]
    if not isinstance(targets, list) or not set(modules) <= set(targets):
        targets = modules
    config = _config_from_saved(saved, targets, adapter_dir)
    if isinstance(config, LoRAConfig):  # before the layers are built: a huge r would allocate r x in each
        check_lora_ranks(config, tensors, adapter_dir)
    entry = entry_for_config(config)
    try:
        # A PiSSA/OLoRA adapter saved unconverted: its base is the residual, re-derived as PEFT does on load.
        initialize = getattr(config, "init", None) in _REDERIVED_INITS
        entry.fn(
            model, config, name=name, initialize=initialize, autocast_adapter_dtype=autocast_adapter_dtype
        )
    except WeightkitError as err:
        raise WeightkitError(f"{adapter_dir}: {err}; the adapter was made for another model") from None
    if isinstance(config, LoRAConfig):
        _warn_on_other_layout(saved, model, name, adapter_dir)
    full_keys = adapter_keys(model, name)
    for module_name, layer in adapter_layers(model).items():
        table = module_name + _EMBEDDING_TABLE
        if isinstance(layer, LoRAEmbedding) and name in layer.adapter_names() and table in tensors:
            full_keys[table] = table
    missing = sorted(set(full_keys) - set(tensors))
    unexpected = sorted(set(tensors) - set(full_keys))
    if missing or unexpected:
        raise WeightkitError(
            f"{adapter_dir}: the adapter's tensors do not fit the model "
            f"(missing: {', '.join(missing[:3]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:3]) or '-'}); the adapter was made for another model"
        )
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in tensors.items():
            target = state[full_keys[key]]
            if value.shape != target.shape:
                raise WeightkitError(
                    f"{adapter_dir}: {key} has shape {tuple(value.shape)}, the model's layer needs "
                    f"{tuple(target.shape)}; the adapter was made for another model"
                )
            target.copy_(value)
    for module_name, state in head.items():
        _untie(model, module_name)
        model.get_submodule(module_name).load_state_dict(state)
    _load_biases(model, biases, adapter_dir)
    if keep_inactive:
        for layer in adapter_layers(model).values():
            layer.active = [n for n in layer.active if n != name]
    return model


def load_base(
    path: str | Path, adapter_dir: str | Path, *, dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> nn.Module:
    """The model of the directory ``path`` built as the base of the adapter in ``adapter_dir``, in eval mode.

    A ``SEQ_CLS`` adapter's base is a sequence classifier (``AutoModelForSequenceClassification``, as PEFT's
    ``AutoPeftModelForSequenceClassification`` builds it) whose ``config.id2label``/``label2id`` come from
    the adapter's ``labels.json`` (written by ``weightkit adapt``); without one the classifier has the
    base config's labels, as with PEFT. Any other adapter's base is :func:`weightkit.models.load`'s model.

    Raises:
        WeightkitError: as :func:`weightkit.models.load`; a ``labels.json`` that is not a list of
            distinct names; a classifier on a quantized checkpoint (not supported).
    """
    from weightkit.models import load as load_model

    adapter_dir = Path(adapter_dir)
    if read_adapter_config(adapter_dir).get("task_type") != "SEQ_CLS":
        return load_model(path, dtype=dtype, allow_pickle=allow_pickle)
    from transformers import AutoModelForSequenceClassification

    from weightkit.quantized.compressed_tensors import is_quantized_checkpoint

    with CheckpointReader(path, allow_pickle=allow_pickle) as reader:  # validates files, refuses pickle
        if reader.config is None:
            raise WeightkitError(f"{path} has no config.json: it is not a Hugging Face model directory")
        if is_quantized_checkpoint(reader.config):
            raise WeightkitError(f"{path}: a classifier adapter on a quantized checkpoint is not supported")
    labels = {}
    if (adapter_dir / LABELS_FILE).is_file():
        try:
            names = json.loads((adapter_dir / LABELS_FILE).read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # ValueError: also UnicodeDecodeError, JSONDecodeError
            raise WeightkitError(
                f"{adapter_dir / LABELS_FILE} is corrupt: cannot parse it as JSON ({e})"
            ) from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise WeightkitError(f"{adapter_dir / LABELS_FILE} must hold a list of label names")
        if len(set(names)) < len(names):
            raise WeightkitError(f"{adapter_dir / LABELS_FILE} names a label twice")
        labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, local_files_only=True, dtype=dtype or "auto", use_safetensors=not allow_pickle or None, **labels
    )
    return model.eval()


def _excluded(module_name: str, exclude) -> bool:
    """PEFT's ``exclude_modules``: a string is a regex the whole name must match, a list holds names or
    suffixes at a dot boundary."""
    if isinstance(exclude, str):
        return re.fullmatch(exclude, module_name) is not None
    return any(module_name == e or module_name.endswith(f".{e}") for e in exclude or ())


def _take_biases(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove the base model's biases PEFT saves with ``bias="all"``/``"lora_only"`` (trained with the
    adapter) from ``tensors``: every ``.bias`` that is not an adapter's own (``lora_B.bias``)."""
    keys = [
        k for k in tensors if k.endswith(".bias") and not any(p.startswith("lora_") for p in k.split("."))
    ]
    return {key: tensors.pop(key) for key in keys}


def _load_biases(model: nn.Module, biases: dict[str, Tensor], where: Path) -> None:
    """Put saved biases into the model, as PEFT loads them (into the base model: they stay when the adapter
    is switched off, in PEFT too). An adapted layer's bias is saved under its ``base_layer``."""
    state = model.state_dict(keep_vars=True)
    for key, value in biases.items():
        if key not in state:
            key = key.replace(".base_layer.", ".")
        target = state.get(key)
        if target is None or target.shape != value.shape:
            raise WeightkitError(f"{where}: the model has no bias {key} of shape {tuple(value.shape)}")
        with torch.no_grad():
            target.copy_(value)


def _warn_on_other_layout(saved: dict, model: nn.Module, name: str, where: Path) -> None:
    """Warn, as PEFT does, where ``fan_in_fan_out`` does not fit an adapted linear layer's layout.

    The flag says whether a layer stores its weight ``in x out`` (GPT-2's ``Conv1D``). PEFT ignores the
    file's value there: each ``nn.Linear`` is read with ``False``, each ``Conv1D`` with ``True``, after a
    warning (the saved factors have the same shapes either way); weightkit reads every layer in its own
    layout too. A model adapted on both kinds saves one value, so some layer always disagrees.
    """
    value = bool(saved.get("fan_in_fan_out"))
    misfits = [
        layer.base_layer
        for layer in adapter_layers(model).values()
        if isinstance(layer, LoRALinear) and name in layer.adapter_names()
        and fan_in_fan_out(layer.base_layer) != value
    ]  # fmt: skip
    if misfits:
        warnings.warn(
            f"{where}: fan_in_fan_out={value} does not fit {len(misfits)} adapted "
            f"{type(misfits[0]).__name__} layer(s); each layer is read in its own layout, as PEFT does",
            stacklevel=3,
        )


def _untie(model: nn.Module, module_name: str) -> None:
    """Give module ``module_name`` its own copy of each parameter it shares with the rest of ``model``.

    A tied ``lm_head`` in ``modules_to_save``: PEFT trains and loads a separate copy of the module and leaves
    the embeddings it was tied to as they were; loading into the shared parameter would change both.
    """
    prefix = module_name + "."
    outside = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(prefix)}
    for owner in model.get_submodule(module_name).modules():
        for key, param in owner._parameters.items():
            if param is not None and id(param) in outside:
                owner._parameters[key] = nn.Parameter(param.detach().clone(), param.requires_grad)


def _take_modules_to_save(
    model: nn.Module, names: list[str], tensors: dict[str, Tensor], where: Path
) -> dict[str, dict[str, Tensor]]:
    """Remove the tensors of the fully saved modules from ``tensors``: ``{module: its state dict}``.

    PEFT's rule: a name stands for every module whose name ends with it (``"pooler.dense"`` is BERT's
    ``bert.pooler.dense``); names no module has are skipped (SEQ_CLS adapters list both ``classifier`` and
    ``score``), as is a matched module the file saves nothing for (PEFT's copy keeps the module's values).
    """
    modules = [n for n, _ in model.named_modules() if n and any(n.endswith(name) for name in names)]
    head = {}
    for module_name in modules:
        expected = model.get_submodule(module_name).state_dict()
        keys = {key: f"{module_name}.{key}" for key in expected}
        if not any(full in tensors for full in keys.values()):
            continue
        state = {key: tensors.pop(full, None) for key, full in keys.items()}
        bad = [k for k, v in state.items() if v is None or v.shape != expected[k].shape]
        if bad:
            raise WeightkitError(
                f"{where}: {module_name}.{bad[0]} is missing or has another shape than the model's"
            )
        head[module_name] = state
    left = [n for n in names if any(key.startswith(f"{n}.") for key in tensors)]
    if left:
        raise WeightkitError(
            f"{where}: the model has no module {left[0]}, which the adapter saves (modules_to_save)"
        )
    return head


def _owning_module(key: str, model: nn.Module, known: set[str]) -> str:
    """The module an adapter tensor key belongs to: its longest dotted prefix that is an adapter layer of the
    model, else its longest prefix that is a module holding parameters of its own (a linear layer, an
    embedding, a norm ...) or a ``QuantizedLinear``."""
    parts = key.split(".")
    prefixes = [".".join(parts[:end]) for end in range(len(parts) - 1, 0, -1)]
    for prefix in prefixes:
        if prefix in known:
            return prefix
    for prefix in prefixes:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        # A QuantizedLinear's weight is a buffer; without a bias it holds no parameter.
        if next(module.parameters(recurse=False), None) is not None or isinstance(module, QuantizedLinear):
            return prefix
    raise WeightkitError(
        f"adapter tensor {key} belongs to no module of the model; it was made for another model"
    )
