"""Method registry: a config's type picks the implementation, and configs round-trip to dicts.

Each method registers itself where it is defined::

    register("quant", "gptq", GPTQConfig, gptq_fn)

A family with one core registers each named variant as a *preset* of one config class: the preset's
values become that name's defaults (``register("merge", "ties", TaskArithmeticConfig, fn,
preset={"sparsify": "magnitude", "sign_consensus": True, "normalize": True})``).

``config_from_dict("quant", {"method": "gptq", "bits": 4})`` builds a validated ``GPTQConfig``;
``config_to_dict(cfg)`` gives back ``{"method": "gptq", "bits": 4, ...}`` for YAML/JSON.
"""

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from weightkit.errors import WeightkitError

__all__ = ["Entry", "register", "refuse", "lookup", "names", "config_from_dict", "config_to_dict"]


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    config_cls: type
    fn: Callable
    preset: dict[str, Any] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, dict[str, Entry]] = {}
# Names users bring from other tools that weightkit does not implement: kind -> name -> why.
_REFUSED: dict[str, dict[str, str]] = {}

# The package whose import registers every method of a kind. Looking a kind up imports it first, so
# ``config_from_dict("merge", ...)`` works in a fresh interpreter whatever was imported before.
_DEFINED_IN = {
    "compress": "weightkit.compress",
    "merge": "weightkit.merge",
    "adapt": "weightkit.adapt",
    "reader": "weightkit.adapt",  # checkpoints read with an adapter merged in (merge's model+lora)
}


def _methods(kind: str) -> dict[str, Entry]:
    if kind in _DEFINED_IN:
        import_module(_DEFINED_IN[kind])
    return _REGISTRY.get(kind, {})


def register(
    kind: str, name: str, config_cls: type, fn: Callable, *, preset: dict[str, Any] | None = None
) -> None:
    """Register ``fn`` as method ``name`` of ``kind``; duplicate names are refused.

    One config class serves several names only as distinct presets (field values that name the variant).
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls.__name__} must be a dataclass")
    methods = _REGISTRY.setdefault(kind, {})
    if name in methods:
        raise ValueError(f"{kind} method {name!r} is already registered")
    preset = dict(preset or {})
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if set(preset) - fields:
        raise ValueError(f"preset {name!r} sets unknown fields {sorted(set(preset) - fields)}")
    for entry in methods.values():
        if entry.config_cls is config_cls and (not preset or not entry.preset or entry.preset == preset):
            raise ValueError(f"{config_cls.__name__} is already registered for {kind} method {entry.name!r}")
    methods[name] = Entry(kind, name, config_cls, fn, preset)


def refuse(kind: str, name: str, reason: str) -> None:
    """Make looking up ``name`` fail with ``reason`` (e.g. a peer tool's method not implemented here),
    instead of an "unknown method" error whose "did you mean" would point at an unrelated method."""
    _REFUSED.setdefault(kind, {})[name] = reason


def names(kind: str) -> list[str]:
    """Sorted names of the registered methods of ``kind``."""
    return sorted(_methods(kind))


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def lookup(kind: str, name: str) -> Entry:
    """The entry for ``name``; an unknown name gets a "did you mean" error listing the choices."""
    methods = _methods(kind)
    if name in _REFUSED.get(kind, {}):
        raise WeightkitError(
            f"{kind} method {name!r}: {_REFUSED[kind][name]}. Known: {', '.join(sorted(methods))}"
        )
    if name not in methods:
        choices = sorted(methods)
        raise WeightkitError(
            f"unknown {kind} method {name!r}.{_did_you_mean(name, choices)} Known: {', '.join(choices)}"
        )
    return methods[name]


def entry_for_config(config: Any) -> Entry:
    """The entry whose config class is ``type(config)``; among presets, the one the config matches best."""
    entries = [e for methods in _REGISTRY.values() for e in methods.values() if type(config) is e.config_cls]
    if not entries:
        raise WeightkitError(f"{type(config).__name__} is not a registered method config")
    # The variant is named by the preset sharing most values with the config (the first on a tie);
    # every field is written out anyway, so a config round-trips whichever name it gets.
    return max(entries, key=lambda e: sum(getattr(config, k) == v for k, v in e.preset.items()))


def config_from_dict(kind: str, data: dict[str, Any]) -> Any:
    """Build the config named by ``data["method"]``; unknown fields get a "did you mean" error."""
    data = dict(data)
    if "method" not in data:
        raise WeightkitError(f"a {kind} config needs a 'method' field (one of: {', '.join(names(kind))})")
    entry = lookup(kind, str(data.pop("method")))
    fields = [f.name for f in dataclasses.fields(entry.config_cls)]
    for key in data:
        if key not in fields:
            hint = _did_you_mean(key, fields) if isinstance(key, str) else ""  # YAML keys may be 1 or null
            options = f"Options: {', '.join(fields)}" if fields else "It takes no options."
            raise WeightkitError(f"{entry.name}: unknown option {key!r}.{hint} {options}")
    hints = typing.get_type_hints(entry.config_cls)
    for key, value in data.items():
        problem = _type_problem(value, hints.get(key))
        if problem:
            raise WeightkitError(f"{entry.name}: {key}={value!r}: {problem}")
    try:
        return entry.config_cls(**{**entry.preset, **data})
    except (TypeError, ValueError) as err:
        raise WeightkitError(f"{entry.name}: {err}") from None


# What a value of each plain type is called in an error message, one and many.
_NAMES = {
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    list: ("a list", "lists"),
    dict: ("a mapping", "mappings"),
    type(None): ("null", "nulls"),
}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML/JSON) fits a field annotated ``hint``: plain types, ``X | None`` and other
    unions, ``list[X]`` and ``dict[str, X]``; any other annotation is the config's to check. An int fits a
    float field; a bool no number field; NaN and infinity no field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return not isinstance(value, bool) and isinstance(value, int)
    if hint is float:  # NaN and infinity (YAML's .nan, .inf) mean nothing in any config
        return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if hint in (str, type(None)):
        return isinstance(value, hint)
    if list in (hint, origin):
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value if args)
    if dict in (hint, origin):
        return isinstance(value, dict) and all(
            _fits(key, args[0]) and _fits(item, args[1]) for key, item in value.items() if args
        )
    return True


def _describe(hint: Any, plural: bool = False) -> str:
    """``hint`` in words, e.g. "an integer or null", "a mapping of strings to mappings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        named = [arg for arg in args if not (arg is int and float in args)]  # a number includes integers
        return " or ".join(_describe(arg, plural) for arg in named)
    if origin in (list, dict) and args:
        many = _describe(args[-1], plural=True)
        one = f"a list of {many}" if origin is list else f"a mapping of {_describe(args[0], True)} to {many}"
        return f"{'lists' if origin is list else 'mappings'} of {many}" if plural else one
    return _NAMES[origin or hint][plural]


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit a field annotated ``hint`` (see :func:`_fits`), or None. Checked before the
    config is built, so a wrong type gets this message instead of whatever error the config's own checks
    would raise on it (an ``AttributeError`` on a list given for a mapping)."""
    if hint is None or _fits(value, hint):
        return None
    if isinstance(value, float) and _fits(0.0, hint):
        return "expected a finite number"
    return f"expected {_describe(hint)}"


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"method": name, **fields}``, plain Python values only, ready for YAML/JSON."""
    entry = entry_for_config(config)
    return {"method": entry.name, **dataclasses.asdict(config)}
