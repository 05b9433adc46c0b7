"""Merge recipes in mergekit's YAML schema, so recipes written for mergekit run unchanged.

```yaml
models:
  - model: ./math-ft
    parameters: {weight: 0.6, density: 0.5}
  - model: ./code-ft
    parameters: {weight: 0.4, density: [0.3, 0.7]}   # a gradient over layers
base_model: ./base
merge_method: ties
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
```

What is read, and how:

- ``merge_method``: any registered merge method (mergekit's names for the methods both tools have).
- ``models[].parameters``: per-model parameters; ``parameters`` at the top: the method's parameters and
  defaults for every model. mergekit's ``lambda`` is weightkit's ``scale``.
- ``dtype`` / ``out_dtype``: weightkit always computes in float32; the output is written in
  ``out_dtype``, else ``dtype``, else each tensor's dtype in the reference model.
- ``slices``: the output's layers, slice by slice, each merged from layer ranges of its ``sources``
  (``passthrough`` stacks them: a "frankenmerge"), with per-source and per-slice ``parameters`` and a
  slice's own ``base_model`` (see :mod:`weightkit.merge.slices`). A slice's ``residual_weight`` (which
  mergekit never uses) and mergekit's ``modules`` are refused, and so is a ``layer_range`` under
  ``models``: mergekit ignores it there and merges every layer.
- ``tokenizer_source``: left out, the reference model's tokenizer is copied; ``base`` also cuts the
  embeddings and ``lm_head`` to its length, as mergekit does. ``union``, another model's tokenizer and
  mergekit's ``tokenizer`` section (new tokens) build a tokenizer, which weightkit does not: refused.
- ``name`` is ignored (a label). ``chat_template`` (``auto`` or a Jinja template) is written into the
  output's tokenizer, as mergekit does (:mod:`weightkit.merge.chat_template`; mergekit's template names
  are refused).
- Model paths are local directories (relative paths are tried from the working directory, then from
  the recipe's directory); nothing is downloaded. ``model+adapter`` (mergekit's LoRA reference) reads the
  model with the PEFT LoRA adapter merged in (:func:`weightkit.merge.engine.open_checkpoint`).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightkit.errors import WeightkitError
from weightkit.merge.engine import check_tokenizer_source, split_reference
from weightkit.merge.slices import MergeSlice, SliceSource
from weightkit.recipe import read_yaml
from weightkit.registry import config_from_dict

__all__ = ["MergeRecipe", "DTYPES", "load_merge_recipe", "merge_recipe_from_dict"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_RENAMED = {"lambda": "scale"}  # mergekit's parameter name -> weightkit's field
_IGNORED = {"name"}
_KNOWN = {
    "models",
    "slices",
    "base_model",
    "merge_method",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
}


@dataclass
class MergeRecipe:
    """A validated merge: what :func:`weightkit.merge.merge` takes."""

    base: Path | None
    models: list[dict[str, Any]]  # {"model": Path, "parameters": {...}}; empty when slices are given
    config: Any
    dtype: torch.dtype | None = None
    source: dict[str, Any] = field(default_factory=dict)  # the recipe as read
    slices: list[MergeSlice] | None = None  # for weightkit.merge.merge_slices, instead of models
    tokenizer_source: str | None = None  # None or "base"
    chat_template: str | None = None  # "auto" or a Jinja template


def load_merge_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a mergekit-style YAML merge recipe (nothing is opened or computed yet).

    Raises:
        WeightkitError: an unreadable file, an unknown method or parameter, a model path that does not
            exist, or a mergekit feature weightkit does not offer; the message names the field.
    """
    path = Path(path)
    doc = read_yaml(path)
    try:
        return merge_recipe_from_dict(doc, relative_to=path.parent)
    except WeightkitError as err:
        raise WeightkitError(f"recipe {path}: {err}") from None


def _model_path(value: Any, relative_to: Path | None) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise WeightkitError(f"a model must be a path, got {value!r}")
    model, adapter = split_reference(str(value))
    if adapter is not None:  # mergekit's model+lora: each part is a local directory
        return Path(f"{_model_path(model, relative_to)}+{_model_path(adapter, relative_to)}")
    candidates = [Path(model)] + ([relative_to / model] if relative_to is not None else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise WeightkitError(
        f"model {model} is not a local directory (weightkit reads local checkpoints and downloads nothing)"
    )


def _renamed(parameters: dict[str, Any]) -> dict[str, Any]:
    return {_RENAMED.get(k, k): v for k, v in parameters.items()}


def _parameters(value: Any, where: str) -> dict[str, Any]:
    parameters = value or {}
    if not isinstance(parameters, dict):
        raise WeightkitError(f"{where}: expected a mapping, got {parameters!r}")
    return _renamed(parameters)


def _slices(value: Any, relative_to: Path | None) -> list[MergeSlice]:
    if not isinstance(value, list) or not value:
        raise WeightkitError("slices: expected a list of {sources: [...], parameters: {...}}")
    slices = []
    for i, piece in enumerate(value):
        where = f"slices[{i}]"
        if not isinstance(piece, dict):
            raise WeightkitError(f"{where}: expected {{sources: [...], parameters: {{...}}}}, got {piece!r}")
        if "residual_weight" in piece:
            raise WeightkitError(
                f"{where}.residual_weight is not supported: mergekit reads it but never applies it; remove it"
            )
        unknown = set(piece) - {"sources", "parameters", "base_model"}
        if unknown:
            raise WeightkitError(
                f"{where}: unknown key(s) {', '.join(map(str, sorted(unknown, key=str)))}; a slice has "
                "sources, parameters and base_model"
            )
        sources = piece.get("sources")
        if not isinstance(sources, list) or not sources:
            raise WeightkitError(f"{where}.sources: expected a list of {{model, layer_range, parameters}}")
        parsed = []
        for j, source in enumerate(sources):
            at = f"{where}.sources[{j}]"
            keys = set(source) if isinstance(source, dict) else set()
            if not {"model", "layer_range"} <= keys <= {"model", "layer_range", "parameters"}:
                raise WeightkitError(
                    f"{at}: expected {{model: path, layer_range: [start, end], parameters: {{...}}}}, "
                    f"got {source!r}"
                )
            model = _model_path(source["model"], relative_to)
            parameters = _parameters(source.get("parameters"), f"{at}.parameters")
            try:
                parsed.append(SliceSource(model, source["layer_range"], parameters))
            except WeightkitError as err:
                raise WeightkitError(f"{at}.{err}") from None
        base = piece.get("base_model")
        slices.append(
            MergeSlice(
                parsed,
                _parameters(piece.get("parameters"), f"{where}.parameters"),
                _model_path(base, relative_to) if base is not None else None,
            )
        )
    return slices


def merge_recipe_from_dict(doc: Any, *, relative_to: Path | None = None) -> MergeRecipe:
    """Validate a recipe already parsed from YAML/JSON (see :func:`load_merge_recipe`)."""
    if not isinstance(doc, dict):
        raise WeightkitError("expected a mapping with merge_method, models and (usually) base_model")
    if "modules" in doc:
        raise WeightkitError(
            "modules (mergekit's slices per module of a multimodal model) are not supported; weightkit "
            "merges models with one stack of layers ('models' or 'slices')"
        )
    if "tokenizer" in doc:
        raise WeightkitError(
            "tokenizer (mergekit's section for a built tokenizer and new tokens' embeddings) is not "
            "supported: weightkit does not build tokenizers; remove it (or use tokenizer_source: base)"
        )
    unknown = set(doc) - _KNOWN - _IGNORED
    if unknown:  # sorted as text: YAML keys may also be numbers or null
        raise WeightkitError(
            f"unknown key(s) {', '.join(map(str, sorted(unknown, key=str)))}; a merge recipe has "
            f"{', '.join(sorted(_KNOWN))}"
        )
    if "merge_method" not in doc:
        raise WeightkitError("missing merge_method (e.g. merge_method: ties)")
    if ("models" in doc) == ("slices" in doc):
        raise WeightkitError("give the models under exactly one of 'models' or 'slices'")
    tokenizer_source = doc.get("tokenizer_source")
    check_tokenizer_source(tokenizer_source)
    slices = _slices(doc["slices"], relative_to) if "slices" in doc else None
    entries = doc.get("models")
    if slices is None and (not isinstance(entries, list) or not entries):
        raise WeightkitError("models: expected a list of {model: path, parameters: {...}}")
    models = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if isinstance(entry, dict) and "layer_range" in entry:
            raise WeightkitError(
                f"models[{i}].layer_range: mergekit ignores layer_range under 'models' and merges every "
                "layer; weightkit refuses it rather than ignore it. To merge a range of layers, give the "
                "models as one slice: slices: [{sources: [{model, layer_range}, ...]}]"
            )
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise WeightkitError(f"models[{i}]: expected {{model: path, parameters: {{...}}}}, got {entry!r}")
        models.append(
            {
                "model": _model_path(entry["model"], relative_to),
                "parameters": _parameters(entry.get("parameters"), f"models[{i}].parameters"),
            }
        )
    base = doc.get("base_model")
    base_path = _model_path(base, relative_to) if base is not None else None
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise WeightkitError(f"parameters: expected a mapping, got {parameters!r}")
    config = config_from_dict("merge", {"method": str(doc["merge_method"]), **_renamed(parameters)})
    dtype_name = doc.get("out_dtype") or doc.get("dtype")
    if dtype_name is not None and (not isinstance(dtype_name, str) or dtype_name not in DTYPES):
        raise WeightkitError(f"dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    chat_template = doc.get("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise WeightkitError(f"chat_template: expected 'auto' or a Jinja template, got {chat_template!r}")
    return MergeRecipe(
        base_path, models, config, DTYPES.get(dtype_name), doc, slices, tokenizer_source, chat_template
    )
