"""Method registry: a config's type picks the implementation, and configs round-trip to dicts.

Each method registers itself where it is defined::

    register("quant", "gptq", GPTQConfig, gptq_fn)

``config_from_dict("quant", {"method": "gptq", "bits": 4})`` builds a validated ``GPTQConfig``;
``config_to_dict(cfg)`` gives back ``{"method": "gptq", "bits": 4, ...}`` for YAML/JSON.
"""

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weightkit.errors import WeightkitError

__all__ = ["Entry", "register", "lookup", "names", "config_from_dict", "config_to_dict"]


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    config_cls: type
    fn: Callable


_REGISTRY: dict[str, dict[str, Entry]] = {}


def register(kind: str, name: str, config_cls: type, fn: Callable) -> None:
    """Register ``fn`` as method ``name`` of ``kind``; duplicate names are refused."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls.__name__} must be a dataclass")
    methods = _REGISTRY.setdefault(kind, {})
    if name in methods:
        raise ValueError(f"{kind} method {name!r} is already registered")
    if any(entry.config_cls is config_cls for entry in methods.values()):
        raise ValueError(f"{config_cls.__name__} is already registered for another {kind} method")
    methods[name] = Entry(kind, name, config_cls, fn)


def names(kind: str) -> list[str]:
    """Sorted names of the registered methods of ``kind``."""
    return sorted(_REGISTRY.get(kind, {}))


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def lookup(kind: str, name: str) -> Entry:
    """The entry for ``name``; an unknown name gets a "did you mean" error listing the choices."""
    methods = _REGISTRY.get(kind, {})
    if name not in methods:
        choices = sorted(methods)
        raise WeightkitError(
            f"unknown {kind} method {name!r}.{_did_you_mean(name, choices)} Known: {', '.join(choices)}"
        )
    return methods[name]


def entry_for_config(config: Any) -> Entry:
    """The entry whose config class is ``type(config)``."""
    for methods in _REGISTRY.values():
        for entry in methods.values():
            if type(config) is entry.config_cls:
                return entry
    raise WeightkitError(f"{type(config).__name__} is not a registered method config")


def config_from_dict(kind: str, data: dict[str, Any]) -> Any:
    """Build the config named by ``data["method"]``; unknown fields get a "did you mean" error."""
    data = dict(data)
    if "method" not in data:
        raise WeightkitError(f"a {kind} config needs a 'method' field (one of: {', '.join(names(kind))})")
    entry = lookup(kind, str(data.pop("method")))
    fields = [f.name for f in dataclasses.fields(entry.config_cls)]
    for key in data:
        if key not in fields:
            hint = _did_you_mean(key, fields)
            raise WeightkitError(f"{entry.name}: unknown option {key!r}.{hint} Options: {', '.join(fields)}")
    try:
        return entry.config_cls(**data)
    except (TypeError, ValueError) as err:
        raise WeightkitError(f"{entry.name}: {err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"method": name, **fields}``, plain Python values only, ready for YAML/JSON."""
    entry = entry_for_config(config)
    return {"method": entry.name, **dataclasses.asdict(config)}
