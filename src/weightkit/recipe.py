"""Recipes: a YAML (or JSON) file holding one method config, validated before anything runs.

```yaml
method: gptq
bits: 4
group_size: 128
act_order: true
```

A compress recipe is one config, not a list of stages: one call runs one method (mixed grids per layer
are the config's ``overrides``). A ``stages:`` list is refused by name rather than half-run.
"""

from pathlib import Path
from typing import Any

import yaml

from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict, config_to_dict

__all__ = ["load_config", "dump_config", "read_yaml"]


def read_yaml(path: Path) -> Any:
    """The parsed YAML (or JSON) document at ``path``, or a clear error naming the file."""
    if not path.is_file():
        raise WeightkitError(f"recipe {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise WeightkitError(f"recipe {path} is not valid YAML: {err}") from None


def load_config(path: str | Path, kind: str = "compress") -> Any:
    """The validated config of the recipe at ``path``.

    Raises:
        WeightkitError: a missing/unparsable file, a document that is not one mapping with a ``method``
            (a ``stages`` list included), or a field that fails validation (the message names it).
    """
    path = Path(path)
    doc = read_yaml(path)
    if isinstance(doc, dict) and "stages" in doc:
        raise WeightkitError(
            f"recipe {path}: a {kind} recipe is one method config (method: ..., bits: ...), not a 'stages' "
            "list; one call runs one method (mixed grids: use 'overrides')"
        )
    if not isinstance(doc, dict):
        raise WeightkitError(f"recipe {path}: expected a mapping with 'method' and its options")
    try:
        return config_from_dict(kind, doc)
    except WeightkitError as err:
        raise WeightkitError(f"recipe {path}: {err}") from None


def dump_config(config: Any) -> str:
    """YAML text of ``config`` that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
