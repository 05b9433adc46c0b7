"""Which modules or tensors a config applies to.

A *pattern* is either an exact module/tensor name (``model.layers.0.mlp.down_proj``) or a regular
expression prefixed with ``re:`` (``re:.*\\.v_proj$``) that must match the whole name.
A *table* maps patterns to values; a name resolves to the value of its exact entry, else of the
first ``re:`` entry that matches (in table order), else of ``_default``.
"""

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from torch import nn

from weightkit.errors import WeightkitError

__all__ = ["DEFAULT_IGNORE", "matches", "resolve", "suffix_pattern_value", "select_modules"]

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


def select_modules(
    model: nn.Module,
    *,
    targets: Iterable[str] = ("_default",),
    ignore: Iterable[str] = DEFAULT_IGNORE,
    types: tuple[type, ...] = (nn.Linear,),
) -> dict[str, nn.Module]:
    """Modules of ``types`` whose names match ``targets`` and none of ``ignore``, in model order.

    ``targets`` holds patterns; ``_default`` stands for every module of ``types``. An exact name or
    pattern that selects nothing is an error that lists close names, so typos do not pass silently.
    """
    targets, ignore = list(targets), list(ignore)
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
