"""mergekit's ``slices``: an output model stacked from layer ranges of the input models.

A recipe's ``slices`` give the output's layers in order. Each slice takes the same number of consecutive
layers from each of its ``sources`` (``layer_range: [start, end]``, ``end`` excluded) and merges them
layer by layer with the recipe's method; a slice with one source and ``merge_method: passthrough`` copies
its layers, so slices of different models (or the same layers twice) stack into a "frankenmerge"::

    slices:
      - sources: [{model: ./a, layer_range: [0, 3]}]
      - sources: [{model: ./b, layer_range: [2, 5]}]
    merge_method: passthrough

This module holds the slices and mergekit's rules for them, as functions over tensor names and configs;
:func:`weightkit.merge.engine.merge_slices` streams the merge. The rules, as mergekit 0.1.5 applies them
(its ``plan.py``, ``config.py`` and ``merge.py``):

- Output layers are numbered consecutively, slice after slice.
- A parameter comes from the source's own ``parameters`` (for its model), else the slice's
  ``parameters``, else the recipe's; a filter list that matches no tensor falls through to the next.
- A gradient runs over each slice's own layers: layer ``i`` of a slice of ``n`` at ``i / (n - 1)`` (at 1
  when the slice has one layer); tensors outside the layers at 0.
- Tensors outside the layers come from the slices at the ends: those before the layers (embeddings) are
  merged from the first slice's sources with its parameters, those after them (final norm, ``lm_head``)
  from the last slice's.
- A method that uses a base model merges each slice against the slice's ``base_model`` (else the
  recipe's), which must be one of the slice's sources: its layers are the ones that source gives.
  Methods without a base model ignore it.
- The output's ``config.json`` is the reference model's (the recipe's ``base_model``, else the first
  slice's first source; mergekit takes an arbitrary model when there is no base model) with the layer
  count (``num_hidden_layers``, ``n_layer`` for GPT-2-style configs) set to the number of output layers.

What mergekit accepts and weightkit refuses by name: a slice's ``residual_weight`` (mergekit reads it
and never uses it), models with several stacks of layers (mergekit needs its ``modules:`` syntax for
them), a last slice with more sources than the first (mergekit merges the final norm and ``lm_head``
from only as many of its sources as the first slice has), and a config whose ``layer_types`` would no
longer match the layer count (mergekit fails on it).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightkit.errors import WeightkitError
from weightkit.merge.params import fall_back, layer_index, layer_stack

__all__ = [
    "SliceSource",
    "MergeSlice",
    "check_slices",
    "check_layer_range",
    "layer_count",
    "before_layers",
    "slice_position",
    "layer_count_update",
    "slice_config",
]

# The config keys mergekit writes the layer count of a one-stack model to: Llama-style and GPT-2-style.
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")


@dataclass
class SliceSource:
    """Layers ``layer_range[0]`` to ``layer_range[1] - 1`` of ``model``, with parameters for that model."""

    model: Path
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.model = Path(self.model)
        numbers = isinstance(self.layer_range, list | tuple) and len(self.layer_range) == 2
        if not numbers or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.layer_range):
            raise WeightkitError(
                f"layer_range: expected [start, end] (layers start to end - 1), got {self.layer_range!r}"
            )
        start, end = self.layer_range
        if not 0 <= start <= end:
            raise WeightkitError(
                f"layer_range: [{start}, {end}] is not a range of layers (0 <= start <= end, end excluded)"
            )
        self.layer_range = (start, end)


@dataclass
class MergeSlice:
    """Consecutive output layers, merged from the same number of layers of each source.

    Attributes:
        sources: the models and layer ranges merged; one source is copied (``passthrough``).
        parameters: the method's parameters for this slice, over the recipe's.
        base: the slice's base model (mergekit's slice-level ``base_model``), else the recipe's.
    """

    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)
    base: Path | None = None

    def __post_init__(self):
        if self.base is not None:
            self.base = Path(self.base)


def check_slices(slices: list[MergeSlice]) -> None:
    """Refuse slices mergekit refuses, or whose meaning weightkit does not reproduce (see the module).

    Raises:
        WeightkitError: no slice, a slice without sources, sources of a slice giving different numbers
            of layers, a model twice in a slice, or a last slice with more sources than the first; the
            message names the slice.
    """
    if not slices:
        raise WeightkitError("slices: expected at least one slice")
    for i, piece in enumerate(slices):
        if not piece.sources:
            raise WeightkitError(f"slices[{i}]: a slice needs at least one source")
        lengths = [end - start for start, end in (s.layer_range for s in piece.sources)]
        if len(set(lengths)) > 1:
            raise WeightkitError(
                f"slices[{i}]: every source must give the same number of layers, got {lengths}"
            )
        paths = [s.model.resolve() for s in piece.sources]
        twice = [s.model for s, path in zip(piece.sources, paths, strict=True) if paths.count(path) > 1]
        if twice:
            raise WeightkitError(
                f"slices[{i}]: {twice[0]} is a source twice; mergekit refuses a model twice in a slice "
                "(merge its layer ranges in separate slices)"
            )
    first, last = len(slices[0].sources), len(slices[-1].sources)
    if last > first:
        raise WeightkitError(
            f"slices[{len(slices) - 1}] has {last} sources and slices[0] {first}: mergekit merges the "
            f"tensors after the layers (final norm, lm_head) from only the first {first} sources of the "
            "last slice; weightkit refuses rather than drop some (give the last slice at most as many)"
        )


def check_layer_range(source: SliceSource, layers: int, where: str) -> None:
    """Refuse a source whose range goes beyond the ``layers`` layers of its model."""
    start, end = source.layer_range
    if end > layers:
        raise WeightkitError(
            f"{where}.layer_range: [{start}, {end}] goes beyond the {layers} layers of {source.model}"
        )


def layer_count(names: list[str], model: Path) -> int:
    """The number of layers the tensor names show: one more than the largest layer index.

    Raises:
        WeightkitError: the names show several stacks of layers (``model.layers.`` and
            ``vision_tower.layers.`` ...).
    """
    stacks = {layer_stack(name) for name in names} - {None}
    if len(stacks) > 1:
        raise WeightkitError(
            f"{model} has several stacks of layers ({', '.join(sorted(stacks))}); mergekit slices such "
            "models with its 'modules:' syntax, which weightkit does not support"
        )
    indices = [index for index in map(layer_index, names) if index is not None]
    return max(indices) + 1 if indices else 0


def before_layers(tensor_name: str) -> bool:
    """Whether a tensor outside the layers comes before them (embeddings) rather than after (final norm,
    ``lm_head``, pooler, classifier): mergekit merges the first kind from the first slice's sources and
    the second from the last slice's.

    Its architecture definitions list, before the layers, exactly the tensors named like embeddings
    (``embed_tokens``, ``wte``, ``wpe``, ``word_embeddings``, ``embeddings.LayerNorm``, ``rotary_pos_emb``
    ...), except GPT-NeoX's output matrix ``embed_out``, and Jais's ``relative_pe``.
    """
    parts = tensor_name.split(".")
    return any(("emb" in p and p != "embed_out") or p in ("wte", "wpe", "relative_pe") for p in parts)


def slice_position(offset: int, length: int) -> float:
    """Where a gradient puts layer ``offset`` of a slice of ``length`` layers (mergekit's ``t``)."""
    return offset / (length - 1) if length > 1 else 1.0


def layer_count_update(config: dict, model_layers: int, merged_layers: int, model: Path) -> dict[str, int]:
    """The change to the reference model's ``config.json``: its layer count, ``merged_layers``.

    Args:
        config: the reference model's config.
        model_layers: the reference model's own layer count (from its tensor names).
        merged_layers: the output's layer count.
        model: the reference model (named in errors).

    Raises:
        WeightkitError: no ``num_hidden_layers`` or ``n_layer`` equals ``model_layers``, or the config's
            ``layer_types`` (one entry per layer) would no longer match: mergekit fails there, as
            transformers checks one against the other.
    """
    keys = [key for key in _LAYER_COUNT_KEYS if config.get(key) == model_layers]
    if not keys:
        raise WeightkitError(
            f"config.json of {model} has no {' or '.join(_LAYER_COUNT_KEYS)} equal to its {model_layers} "
            "layers, so the merged model's layer count cannot be written"
        )
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) != merged_layers:
        raise WeightkitError(
            f"config.json of {model} gives layer_types for {len(layer_types)} layers and the merged model "
            f"has {merged_layers}: which type each merged layer has is not defined (mergekit fails here)"
        )
    return {keys[0]: merged_layers}


def slice_config(config: Any, parameters: dict[str, Any]) -> Any:
    """The method's config with a slice's parameters over the recipe's (``config``).

    Raises:
        WeightkitError: a parameter the method does not have, or a value its config refuses.
    """
    fields = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(parameters) - set(fields))
    if unknown:
        raise WeightkitError(
            f"parameters: unknown option(s) {', '.join(unknown)} (options: {', '.join(fields) or 'none'})"
        )
    values = {key: fall_back(value, getattr(config, key)) for key, value in parameters.items()}
    try:
        return dataclasses.replace(config, **values)
    except (TypeError, ValueError, WeightkitError) as err:
        raise WeightkitError(f"parameters: {err}") from None
