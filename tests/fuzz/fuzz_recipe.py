"""Coverage-guided fuzzing (atheris) of the recipe parsers: compress recipes (one config or ``stages``),
mergekit-style merge recipes, and adapter configs built from a mapping (what ``weightkit adapt --option``
and a saved weightkit adapter feed ``config_from_dict``).

Each input is the text of a YAML (or JSON) file, read by all three. Each must return a validated config or
raise ``WeightkitError``; anything else is a finding. Run through ``run.sh``.
"""

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["weightkit"]):
    import yaml

    from weightkit.errors import WeightkitError
    from weightkit.merge.recipe import load_merge_recipe
    from weightkit.recipe import load_config, read_yaml
    from weightkit.registry import config_from_dict

_DIR = Path(tempfile.mkdtemp(prefix="fuzz-recipe-"))
_RECIPE = _DIR / "recipe.yaml"
# Merge recipes name model directories; these exist, so the parser goes past its path check.
(_DIR / "base").mkdir()
(_DIR / "ft").mkdir()

SEEDS = [
    {"method": "rtn", "bits": 4, "group_size": 32},
    {
        "method": "gptq",
        "bits": 3,
        "group_size": 128,
        "act_order": True,
        "overrides": {"re:.*q_proj": {"bits": 8}},
    },
    {"method": "awq", "bits": 4},
    {"method": "svd", "rank": 8},
    {"method": "magnitude", "sparsity": 0.5},
    {"stages": [{"method": "sparsegpt", "sparsity": "2:4"}, {"method": "gptq", "bits": 4}]},
    {"method": "lora", "rank": 8, "alpha": 16, "targets": ["q_proj", "re:.*v_proj"], "dropout": 0.1},
    {"method": "bone", "rank": 4},
    {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "ft", "parameters": {"weight": 0.5, "density": [0.3, 0.7]}}, "base"],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    },
    {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}]}],
        "tokenizer_source": "base",
    },
    {"merge_method": "slerp", "base_model": "base", "models": ["base", "ft"], "parameters": {"t": 0.3}},
]


def seed_corpus(corpus: Path) -> None:
    for i, doc in enumerate(SEEDS):
        (corpus / f"seed{i}.yaml").write_text(yaml.safe_dump(doc))


def test_one_input(data: bytes) -> None:
    _RECIPE.write_bytes(data)
    with contextlib.suppress(WeightkitError):
        load_config(_RECIPE, "compress")
    with contextlib.suppress(WeightkitError):
        load_merge_recipe(_RECIPE)
    with contextlib.suppress(WeightkitError):
        doc = read_yaml(_RECIPE)
        if isinstance(doc, dict):
            config_from_dict("adapt", doc)


if __name__ == "__main__":
    from fuzz_common import prepare

    atheris.Setup(prepare(sys.argv, seed_corpus), test_one_input)
    atheris.Fuzz()
