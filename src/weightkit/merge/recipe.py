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
- ``slices`` holding one slice whose sources all span every layer (``layer_range: [0, N]``) is the same
  as ``models``; other slicing (stacking layers of different models) is refused with a clear error.
- ``tokenizer_source: base`` (the default here: the reference model's tokenizer is copied); ``union``
  and other vocabulary surgery are refused.
- ``name`` is ignored (a label). ``chat_template`` is refused: mergekit writes it into the output's
  tokenizer, which weightkit does not do yet.
- Model paths are local directories (relative paths are tried from the working directory, then from
  the recipe's directory); nothing is downloaded.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightkit.errors import WeightkitError
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
}


@dataclass
class MergeRecipe:
    """A validated merge: what :func:`weightkit.merge.merge` takes."""

    base: Path | None
    models: list[dict[str, Any]]  # {"model": Path, "parameters": {...}}
    config: Any
    dtype: torch.dtype | None = None
    source: dict[str, Any] = field(default_factory=dict)  # the recipe as read


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
    text = str(value)
    if "+" in text and not Path(text).exists():
        raise WeightkitError(f"{text}: 'model+lora' references are not supported; merge the LoRA first")
    candidates = [Path(text)] + ([relative_to / text] if relative_to is not None else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise WeightkitError(
        f"model {text} is not a local directory (weightkit reads local checkpoints and downloads nothing)"
    )


def _renamed(parameters: dict[str, Any]) -> dict[str, Any]:
    return {_RENAMED.get(k, k): v for k, v in parameters.items()}


def _models_from_slices(slices: Any) -> list[dict[str, Any]]:
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise WeightkitError(
            "slices: only one slice spanning every layer of every model is supported (it equals 'models'); "
            "stacking layer ranges of different models (a passthrough 'frankenmerge') is not"
        )
    sources = slices[0].get("sources")
    if not isinstance(sources, list) or not sources:
        raise WeightkitError("slices[0].sources: expected a list of {model, layer_range, parameters}")
    ranges = {tuple(s.get("layer_range") or ()) for s in sources if isinstance(s, dict)}
    if len(ranges) != 1:
        raise WeightkitError(f"slices[0]: every source must have the same layer_range, got {sorted(ranges)}")
    return [{k: v for k, v in s.items() if k != "layer_range"} for s in sources]


def merge_recipe_from_dict(doc: Any, *, relative_to: Path | None = None) -> MergeRecipe:
    """Validate a recipe already parsed from YAML/JSON (see :func:`load_merge_recipe`)."""
    if not isinstance(doc, dict):
        raise WeightkitError("expected a mapping with merge_method, models and (usually) base_model")
    if "chat_template" in doc:
        raise WeightkitError(
            "chat_template is not supported (mergekit writes it into the output's tokenizer); remove it and "
            "set chat_template in the merged model's tokenizer_config.json"
        )
    unknown = set(doc) - _KNOWN - _IGNORED
    if unknown:
        raise WeightkitError(
            f"unknown key(s) {', '.join(sorted(unknown))}; a merge recipe has {', '.join(sorted(_KNOWN))}"
        )
    if "merge_method" not in doc:
        raise WeightkitError("missing merge_method (e.g. merge_method: ties)")
    if ("models" in doc) == ("slices" in doc):
        raise WeightkitError("give the models under exactly one of 'models' or 'slices'")
    entries = doc["models"] if "models" in doc else _models_from_slices(doc["slices"])
    if not isinstance(entries, list) or not entries:
        raise WeightkitError("models: expected a list of {model: path, parameters: {...}}")
    tokenizer_source = doc.get("tokenizer_source", "base")
    if tokenizer_source not in (None, "base"):
        raise WeightkitError(
            f"tokenizer_source: {tokenizer_source!r} is not supported; the reference model's tokenizer "
            "(the base model's, else the first model's) is copied (tokenizer_source: base)"
        )
    models = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise WeightkitError(f"models[{i}]: expected {{model: path, parameters: {{...}}}}, got {entry!r}")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise WeightkitError(f"models[{i}].parameters: expected a mapping, got {parameters!r}")
        models.append({"model": _model_path(entry["model"], relative_to), "parameters": _renamed(parameters)})
    base = doc.get("base_model")
    base_path = _model_path(base, relative_to) if base is not None else None
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise WeightkitError(f"parameters: expected a mapping, got {parameters!r}")
    config = config_from_dict("merge", {"method": str(doc["merge_method"]), **_renamed(parameters)})
    dtype_name = doc.get("out_dtype") or doc.get("dtype")
    if dtype_name is not None and dtype_name not in DTYPES:
        raise WeightkitError(f"dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    return MergeRecipe(base_path, models, config, DTYPES.get(dtype_name), doc)
