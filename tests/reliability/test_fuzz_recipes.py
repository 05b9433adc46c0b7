"""Issue 18, item 2: fuzzed recipes and method configs give a validated config or weightkit's own error.

Property tests (hypothesis) for every verb that takes a config: compress recipes (one config or
``stages``), mergekit-style merge recipes and adapter configs, written as YAML or JSON files with valid and
unknown method names, real and unknown fields, values of every JSON type (out of range, NaN, huge) and
hostile YAML (aliases of aliases, non-UTF-8 text, impossible dates). Each is a config that round-trips, or
a ``WeightkitError`` naming the recipe; never another exception. Every registered config class is also
built directly from well-typed but arbitrary field values: its ``__post_init__`` accepts them or raises
``WeightkitError``. Settings (derandomized, ``WEIGHTKIT_FUZZ_EXAMPLES``) are in tests/conftest.py.
"""

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from weightkit.errors import WeightkitError
from weightkit.merge.recipe import MergeRecipe, load_merge_recipe
from weightkit.recipe import MAX_RECIPE_NODES, dump_config, load_config, read_yaml
from weightkit.registry import config_from_dict, config_to_dict, lookup, names

KINDS = ("compress", "merge", "adapt")
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "2:4", "4:8", "auto", "magnitude", "re:.*q_proj", "re:(", "_default", "e4m3"])
    | st.text(max_size=5)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _fields(kind: str) -> list[str]:
    return sorted({f.name for m in names(kind) for f in dataclasses.fields(lookup(kind, m).config_cls)})


@st.composite
def method_configs(draw, kind: str) -> dict:
    """A config dict: mostly a real method with some of its real fields, sometimes anything."""
    method = draw(st.sampled_from(names(kind)) | st.text(max_size=6) | VALUES)
    config = {} if draw(st.integers(0, 9)) == 0 else {"method": method}
    real = (
        [f.name for f in dataclasses.fields(lookup(kind, method).config_cls)] if method in names(kind) else []
    )
    keys = st.sampled_from(real or _fields(kind)) | st.sampled_from(_fields(kind)) | st.text(max_size=6)
    for key in draw(st.lists(keys, max_size=4, unique=True)):
        config[key] = draw(VALUES)
    return config


def _dump(doc, as_json: bool) -> str:
    return json.dumps(doc) if as_json else yaml.safe_dump(doc)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-recipes") / "recipe.yaml"


def _config_or_refused(path: Path, read):
    """``read(path)``, or None when it raised a WeightkitError naming the recipe."""
    try:
        return read(path)
    except WeightkitError as err:
        assert str(path) in str(err)
        return None


COMPRESS_RECIPES = method_configs("compress") | st.fixed_dictionaries(
    {"stages": st.lists(method_configs("compress"))}
)


@given(doc=COMPRESS_RECIPES, as_json=st.booleans())
def test_compress_recipes_are_validated_or_refused(recipe, doc, as_json):
    recipe.write_text(_dump(doc, as_json))
    config = _config_or_refused(recipe, lambda p: load_config(p, "compress"))
    for stage in config if isinstance(config, list) else [config] if config is not None else []:
        recipe.write_text(dump_config(stage))
        assert load_config(recipe, "compress") == stage  # what was accepted round-trips


@given(doc=method_configs("adapt"), as_json=st.booleans())
def test_adapter_configs_are_validated_or_refused(recipe, doc, as_json):
    recipe.write_text(_dump(doc, as_json))
    config = _config_or_refused(recipe, lambda p: load_config(p, "adapt"))
    if config is not None:
        assert config_from_dict("adapt", config_to_dict(config)) == config


MODELS = st.sampled_from(["base", "ft", "missing", "ft+base", ""]) | VALUES


@st.composite
def merge_recipes(draw) -> dict:
    """A mergekit-style recipe: its keys (sometimes unknown ones) with real-looking or arbitrary values."""
    config = draw(method_configs("merge"))
    doc = {"merge_method": config.pop("method")} if "method" in config else {}
    if config or draw(st.booleans()):
        doc["parameters"] = config if draw(st.integers(0, 5)) else draw(VALUES)
    model = st.fixed_dictionaries({"model": MODELS}, optional={"parameters": VALUES, "layer_range": VALUES})
    source = st.fixed_dictionaries({"model": MODELS, "layer_range": VALUES}, optional={"parameters": VALUES})
    piece = st.fixed_dictionaries({"sources": st.lists(source, max_size=2) | VALUES},
                                  optional={"parameters": VALUES, "base_model": MODELS})  # fmt: skip
    optional = {
        "models": st.lists(model | MODELS, max_size=3) | VALUES,
        "slices": st.lists(piece, max_size=2) | VALUES,
        "base_model": MODELS,
        "dtype": st.sampled_from(["bfloat16", "float32", "int8"]) | VALUES,
        "out_dtype": VALUES,
        "tokenizer_source": st.sampled_from(["base", "union"]) | VALUES,
        "chat_template": VALUES,
        "name": VALUES,
        "modules": VALUES,
        "residual_weight": VALUES,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        doc[key] = draw(optional[key])
    return doc


@given(doc=merge_recipes(), as_json=st.booleans())
def test_merge_recipes_are_validated_or_refused(recipe, doc, as_json):
    for model in ("base", "ft"):
        (recipe.parent / model).mkdir(exist_ok=True)
    recipe.write_text(_dump(doc, as_json))
    parsed = _config_or_refused(recipe, load_merge_recipe)
    assert parsed is None or isinstance(parsed, MergeRecipe)


@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_is_a_recipe_or_refused(recipe, text):
    recipe.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    for kind in ("compress", "adapt"):
        _config_or_refused(recipe, lambda p, kind=kind: load_config(p, kind))
    _config_or_refused(recipe, load_merge_recipe)


@given(kind=st.sampled_from(KINDS), data=st.data())
def test_config_classes_accept_or_refuse_well_typed_values(kind, data):
    """Each config's own checks (``__post_init__``), given values of its fields' declared types: out of
    range, NaN, empty, odd patterns. The registry refuses wrong types before a config sees them."""
    entry = lookup(kind, data.draw(st.sampled_from(names(kind))))
    hints = typing.get_type_hints(entry.config_cls)
    kwargs = dict(entry.preset)
    fields = dataclasses.fields(entry.config_cls)
    for field in data.draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []:
        kwargs[field.name] = data.draw(VALUES.filter(lambda v, h=hints[field.name]: _typed(v, h)))
    try:
        entry.config_cls(**kwargs)
    except WeightkitError as err:
        assert str(err)


def _typed(value, hint) -> bool:
    from weightkit.registry import _type_problem

    return _type_problem(value, hint) is None


# -- regression tests for what the fuzzing found -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"method: rtn\nbits: \xfa\n", "is not UTF-8 text"),
        ("method: rtn\nbits: 2001-02-30\n", "is not valid YAML: day is out of range"),
        ("method: rtn\nbits: " + "9" * 5000 + "\n", "is not valid YAML: Exceeds the limit"),
        ("method: !!timestamp x\n", "is not valid YAML"),
        ("[" * 5000, "is not valid YAML"),
        ("method: rtn\ntargets: &a [*a]\n", "contains itself"),
        (
            "method: rtn\n"
            + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)).replace(
                "*l0", "x"
            ),
            f"more than {MAX_RECIPE_NODES} values",
        ),
    ],
    ids=["not-utf8", "bad-date", "huge-int", "bad-timestamp", "deep", "cycle", "billion-laughs"],
)
def test_hostile_yaml_is_refused_by_name(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(WeightkitError, match=message) as err:
        read_yaml(path)
    assert str(path) in str(err.value)


def test_repeating_a_value_with_an_alias_is_still_fine(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: rtn\ntargets: &t [re:.*q_proj]\nignore: *t\n")
    assert load_config(path).ignore == ["re:.*q_proj"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"method": "gptq", "overrides": ["re:.*q_proj"]},
         r"overrides=\['re:.\*q_proj'\]: expected a mapping of strings to mappings"),
        ({"method": "rtn", "targets": "q_proj"}, "targets='q_proj': expected a list of strings"),
        ({"method": "rtn", "group_size": "128"}, "group_size='128': expected an integer or null"),
        ({"method": "magnitude", "sparsity": [0.5]}, r"sparsity=\[0.5\]: expected a number or a string"),
        ({"method": "rtn", 1: 2}, "rtn: unknown option 1"),
    ],
)  # fmt: skip
def test_wrong_field_types_are_named(tmp_path, doc, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(WeightkitError, match=message):
        load_config(path)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(("method", "field"), [("lora", "alpha"), ("lora", "dropout")])
def test_non_finite_numbers_are_refused(tmp_path, method, field, value):
    """Before the fix LoRA took alpha: .nan, and every merge method a weight or scale of NaN or infinity."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"method: {method}\n{field}: {value}\n")
    with pytest.raises(WeightkitError, match=f"{method}: {field}=.*: expected a finite number"):
        load_config(path, "adapt")


def test_non_finite_merge_weights_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(f"merge_method: linear\nmodels: [{tmp_path / 'a'}]\nparameters: {{weight: .nan}}\n")
    with pytest.raises(WeightkitError, match="linear: weight=nan: expected a finite number"):
        load_merge_recipe(path)


def test_lora_patterns_must_map_names_to_numbers():
    with pytest.raises(WeightkitError, match="rank_pattern=.*: expected a mapping of strings to integers"):
        config_from_dict("adapt", {"method": "lora", "rank_pattern": {"q_proj": "8"}})


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"merge_method": "linear", "models": ["a"], 1: 2, "x": 3}, "unknown key.s. 1, x"),
        ({"merge_method": "linear", "models": ["a"], "dtype": ["bf16"]}, r"dtype \['bf16'\] is not one of"),
        ({"merge_method": "passthrough", "slices": [{"sources": [], 0: 1, "y": 2}]},
         r"slices\[0\]: unknown key.s. 0, y"),
    ],
)  # fmt: skip
def test_merge_recipe_keys_and_dtype_of_any_type_are_named(tmp_path, doc, message):
    (tmp_path / "a").mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc).replace("models:\n- a", f"models:\n- {tmp_path / 'a'}"))
    with pytest.raises(WeightkitError, match=message):
        load_merge_recipe(path)
