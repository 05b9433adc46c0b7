"""Which modules or tensors a config applies to.

A *pattern* is either an exact module/tensor name (``model.layers.0.mlp.down_proj``) or a regular
expression prefixed with ``re:`` (``re:.*\\.v_proj$``) that must match the whole name.
The target ``all-linear`` stands for every linear layer except the model's output layers, as PEFT's
``target_modules="all-linear"`` (:func:`all_linear_modules`).
A *table* maps patterns to values; a name resolves to the value of its exact entry, else of the
first ``re:`` entry that matches (in table order), else of ``_default``.
"""

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from torch import nn
from transformers.pytorch_utils import Conv1D

from weightkit.errors import WeightkitError
from weightkit.quantized.linear import QuantizedLinear

__all__ = [
    "DEFAULT_IGNORE",
    "LINEAR_TYPES",
    "ALL_LINEAR",
    "matches",
    "resolve",
    "suffix_pattern_value",
    "all_linear_modules",
    "select_modules",
]

T = TypeVar("T")

# Embeddings, the output head and norms are small, sensitive, or both: leave them alone unless asked.
DEFAULT_IGNORE = ["re:(.*\\.)?lm_head", "re:.*embed.*", "re:.*norm.*", "re:.*pooler.*"]


def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern[3:])
    except re.error as err:
        raise WeightkitError(f"bad pattern {pattern!r}: {err}") from None


def matches(name: str, pattern: str) -> bool:
    """Whether ``name`` is ``pattern`` (exact) or fully matches it (``re:...``)."""
    if pattern.startswith("re:"):
        return _regex(pattern).fullmatch(name) is not None
    return name == pattern


def resolve(name: str, table: Mapping[str, T]) -> T | None:
    """The value for ``name``: exact entry, then first matching ``re:`` entry, then ``_default``."""
    if name in table:
        return table[name]
    for pattern, value in table.items():
        if pattern.startswith("re:") and matches(name, pattern):
            return value
    return table.get("_default")


def suffix_pattern_value(name: str, table: Mapping[str, T]) -> T | None:
    """The value for module ``name`` in a PEFT-style ``rank_pattern``/``alpha_pattern`` table, or None.

    PEFT's rule (``peft.utils.other.get_pattern_key``): each key is a regular expression matched against
    the end of the name at a dot boundary (``"0"`` matches ``layers.2.0`` but not ``layers.20``), and the
    first matching key in table order wins. A ``re:`` key fully matches the name instead, as everywhere
    in weightkit.
    """
    for key, value in table.items():
        pattern = key[3:] if key.startswith("re:") else rf"(.*\.)?(?:{key})"
        try:
            if re.fullmatch(pattern, name):
                return value
        except re.error as err:
            raise WeightkitError(f"bad pattern {key!r}: {err}") from None
    return None


# The layers computing ``y = x W^T + b``: ``nn.Linear`` and GPT-2's ``Conv1D`` (transformers), which stores
# the same ``W`` transposed, ``in x out``.
LINEAR_TYPES = (nn.Linear, Conv1D)
ALL_LINEAR = "all-linear"
# PEFT's names for a sequence classifier's head (peft.utils.constants.SEQ_CLS_HEAD_NAMES).
_CLASSIFIER_HEADS = ("score", "classifier")


def all_linear_modules(model: nn.Module) -> list[str]:
    """PEFT's ``target_modules="all-linear"`` on ``model``, in model order.

    Every ``nn.Linear``, transformers ``Conv1D`` and ``QuantizedLinear`` (PEFT counts its quantized linear
    layers alike), or adapter layer around one, except: the output embeddings (``lm_head``, from
    ``get_output_embeddings()``); with none, the module a sequence classifier
    names ``score`` or ``classifier`` (PEFT drops it for ``task_type="SEQ_CLS"``, which such a model is
    trained with; the head is trained in full instead); and the layers inside adapter layers.
    """
    modules = dict(model.named_modules())
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [output] if output is not None else [getattr(model, n, None) for n in _CLASSIFIER_HEADS]
    head = next((h for h in heads if isinstance(h, nn.Module)), None)
    excluded |= {name for name, m in modules.items() if head is not None and m is head}
    for name, module in modules.items():
        if hasattr(module, "base_layer"):  # an adapter layer: what it holds is not a target
            excluded |= {f"{name}.{inner}" for inner, _ in module.named_modules() if inner}
    return [
        name
        for name, m in modules.items()
        if name not in excluded and isinstance(getattr(m, "base_layer", m), (*LINEAR_TYPES, QuantizedLinear))
    ]


def select_modules(
    model: nn.Module,
    *,
    targets: Iterable[str] = ("_default",),
    ignore: Iterable[str] = DEFAULT_IGNORE,
    types: tuple[type, ...] = (nn.Linear,),
) -> dict[str, nn.Module]:
    """Modules of ``types`` whose names match ``targets`` and none of ``ignore``, in model order.

    ``targets`` holds patterns; ``_default`` stands for every module of ``types``, ``all-linear`` for
    :func:`all_linear_modules`. An exact name or pattern that selects nothing is an error that lists close
    names, so typos do not pass silently.
    """
    targets, ignore = list(targets), list(ignore)
    if ALL_LINEAR in targets:
        targets.remove(ALL_LINEAR)
        targets += all_linear_modules(model)
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, types)}
    for pattern in targets:
        if pattern != "_default" and not any(matches(n, pattern) for n in candidates):
            close = difflib.get_close_matches(pattern.removeprefix("re:"), list(candidates), n=3, cutoff=0.4)
            hint = f" Close names: {', '.join(close)}" if close else ""
            kinds = "/".join(t.__name__ for t in types)
            raise WeightkitError(f"target {pattern!r} matches no {kinds} module.{hint}")
    return {
        name: m
        for name, m in candidates.items()
        if any(p == "_default" or matches(name, p) for p in targets)
        and not any(matches(name, p) for p in ignore)
    }
