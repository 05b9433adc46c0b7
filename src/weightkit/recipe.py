"""Recipes: a YAML (or JSON) file holding an ordered list of method configs, validated before anything runs.

```yaml
stages:
  - method: gptq
    bits: 4
    group_size: 128
    act_order: true
```

A file holding a single mapping with a ``method`` key is a one-stage recipe.
"""

from pathlib import Path
from typing import Any

import yaml

from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict, config_to_dict

__all__ = ["load_recipe", "dump_recipe", "read_yaml"]


def read_yaml(path: Path) -> Any:
    """The parsed YAML (or JSON) document at ``path``, or a clear error naming the file."""
    if not path.is_file():
        raise WeightkitError(f"recipe {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise WeightkitError(f"recipe {path} is not valid YAML: {err}") from None


def load_recipe(path: str | Path, kind: str = "compress") -> list[Any]:
    """The validated configs of the recipe at ``path``, in order.

    Raises:
        WeightkitError: missing/unparsable file, no stages, or a stage that fails validation
            (the message names the stage and the field).
    """
    path = Path(path)
    doc = read_yaml(path)
    stages = doc.get("stages") if isinstance(doc, dict) and "method" not in doc else [doc]
    if not isinstance(stages, list) or not stages:
        raise WeightkitError(f"recipe {path}: expected a 'stages' list of method configs (or one config)")
    configs = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise WeightkitError(
                f"recipe {path}, stage {i + 1}: expected a mapping, got {type(stage).__name__}"
            )
        try:
            configs.append(config_from_dict(kind, stage))
        except WeightkitError as err:
            raise WeightkitError(f"recipe {path}, stage {i + 1}: {err}") from None
    return configs


def dump_recipe(configs: list[Any]) -> str:
    """YAML text of ``configs`` that :func:`load_recipe` reads back to equal configs."""
    return yaml.safe_dump({"stages": [config_to_dict(c) for c in configs]}, sort_keys=False)
