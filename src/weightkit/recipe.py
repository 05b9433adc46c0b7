"""Recipes: a YAML (or JSON) file holding one method config, validated before anything runs.

```yaml
method: gptq
bits: 4
group_size: 128
act_order: true
```

A compress recipe may instead chain stages, pruning then quantizing (mixed grids per layer are a config's
``overrides``, not stages):

```yaml
stages:
  - {method: sparsegpt, sparsity: "2:4"}
  - {method: gptq, bits: 4}
```

Every stage's config is validated here; their order (pruning first, at most one quantization, last) by
:func:`weightkit.compress.prune.stages.check_stages` before any stage runs.
"""

from pathlib import Path
from typing import Any

import yaml

from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict, config_to_dict

__all__ = ["MAX_RECIPE_NODES", "load_config", "dump_config", "read_yaml"]


# A recipe is a small tree, but YAML's anchors and aliases (&a, *a) make a graph: a document that holds itself
# (&a [*a]) or, with aliases of aliases, billions of nodes in a few lines ("billion laughs"), which would
# hang whatever walks it, the repr in an error message included. Aliases that repeat a value are fine.
MAX_RECIPE_NODES = 100_000


def _refuse_graph(doc: Any, path: Path) -> None:
    """Refuse a document that contains itself or expands to more than MAX_RECIPE_NODES values."""
    stack = [(doc, frozenset())]  # a value and the ids of the containers above it
    visited = 0
    while stack:
        visited += 1
        if visited > MAX_RECIPE_NODES:
            raise WeightkitError(
                f"recipe {path} expands to more than {MAX_RECIPE_NODES} values (YAML aliases of aliases?)"
            )
        value, above = stack.pop()
        if isinstance(value, dict | list):
            if id(value) in above:
                raise WeightkitError(f"recipe {path} contains itself (a YAML alias inside its own anchor)")
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            inner = above | {id(value)}
            stack.extend((child, inner) for child in children)


def read_yaml(path: Path) -> Any:
    """The parsed YAML (or JSON) document at ``path``, or a clear error naming the file."""
    if not path.is_file():
        raise WeightkitError(f"recipe {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise WeightkitError(f"recipe {path} is not UTF-8 text: {err}") from None
    # PyYAML lets Python's own errors through for some malformed values (the date 2001-02-30, an integer of
    # 5000 digits, "!!timestamp x") and recurses once per level of nesting.
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as err:
        raise WeightkitError(f"recipe {path} is not valid YAML: {err}") from None
    _refuse_graph(doc, path)
    return doc


def _stages(path: Path, doc: dict, kind: str) -> list[Any]:
    """The validated configs of a ``stages:`` recipe, in order."""
    if kind != "compress":
        raise WeightkitError(f"recipe {path}: a {kind} recipe is one method config, not a 'stages' list")
    if set(doc) != {"stages"}:
        raise WeightkitError(
            f"recipe {path}: beside 'stages' a recipe holds nothing; got {sorted(doc, key=str)}"
        )
    stages = doc["stages"]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise WeightkitError(f"recipe {path}: 'stages' must be a non-empty list of method configs")
    configs = []
    for i, stage in enumerate(stages, start=1):
        try:
            configs.append(config_from_dict(kind, stage))
        except WeightkitError as err:
            raise WeightkitError(f"recipe {path}: stage {i}: {err}") from None
    return configs


def load_config(path: str | Path, kind: str = "compress") -> Any:
    """The validated config of the recipe at ``path``; for a compress recipe with ``stages:``, the list of
    its stages' configs.

    Raises:
        WeightkitError: a missing/unparsable file, a document that is not one mapping with a ``method`` (or,
            for compress, a ``stages`` list of them), or a field that fails validation (the message names it).
    """
    path = Path(path)
    doc = read_yaml(path)
    if isinstance(doc, dict) and "stages" in doc:
        return _stages(path, doc, kind)
    if not isinstance(doc, dict):
        raise WeightkitError(f"recipe {path}: expected a mapping with 'method' and its options")
    try:
        return config_from_dict(kind, doc)
    except WeightkitError as err:
        raise WeightkitError(f"recipe {path}: {err}") from None


def dump_config(config: Any) -> str:
    """YAML text of ``config`` that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
