"""mergekit's ``slices`` (weightkit.merge.slices, engine.merge_slices): parity with mergekit's own outputs,
mergekit's rules as functions, and what is refused by name."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightkit.errors import WeightkitError
from weightkit.merge import MergeSlice, SliceSource, merge, merge_slices
from weightkit.merge.params import fall_back, layer_stack, value_at, with_layer_index
from weightkit.merge.recipe import merge_recipe_from_dict
from weightkit.merge.slices import before_layers, layer_count, layer_count_update, slice_position
from weightkit.registry import config_from_dict

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_slice_fixtures", FIXTURES / "make_slice_fixtures.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)
MANIFEST = json.loads((FIXTURES / "slices" / "manifest.json").read_text())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The checkpoints mergekit merged for the fixtures, rebuilt (and checked to be the same)."""
    root = tmp_path_factory.mktemp("slice-inputs")
    paths = make.build_inputs(root)
    for name, path in paths.items():
        assert make.weights_hash(path) == MANIFEST["inputs"][name], (
            f"{name} differs from the checkpoint mergekit merged (torch/transformers version?); "
            "rerun tests/merge/fixtures/make_slice_fixtures.py"
        )
    return root


def _run(recipe_doc: dict, out: Path, **options):
    recipe = merge_recipe_from_dict(recipe_doc)
    args = (recipe.base, recipe.slices if recipe.slices is not None else recipe.models, recipe.config, out)
    run = merge_slices if recipe.slices is not None else merge
    return run(*args, progress=False, tokenizer_source=recipe.tokenizer_source, **options)


# -- parity with mergekit 0.1.5 -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(make.RECIPES))
def test_output_equals_mergekits(inputs, tmp_path, name):
    _run(make.resolve(make.RECIPES[name], inputs), tmp_path / "out")
    ours = _weights(tmp_path / "out")
    theirs = load_file(FIXTURES / "slices" / f"{name}.safetensors")
    assert sorted(ours) == sorted(theirs)
    for tensor_name, expected in theirs.items():
        assert ours[tensor_name].shape == expected.shape, tensor_name
        torch.testing.assert_close(ours[tensor_name], expected, rtol=0, atol=1e-6, msg=tensor_name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in MANIFEST["recipes"][name].items():
        assert config[key] == value, key


def test_a_frankenmerge_copies_each_layer_from_its_source(inputs, tmp_path):
    # What the fixture holds, said directly: output layer i is layer i of A (i < 3), then B's 2, 3, 4.
    _run(make.resolve(make.RECIPES["passthrough_frankenmerge"], inputs), tmp_path / "out")
    out, a, b = _weights(tmp_path / "out"), _weights(inputs / "llama-a"), _weights(inputs / "llama-b")
    sources = [(a, 0), (a, 1), (a, 2), (b, 2), (b, 3), (b, 4)]
    for layer, (model, source_layer) in enumerate(sources):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(out[name], model[with_layer_index(name, source_layer)]), name
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])


def test_one_slice_over_every_layer_is_the_models_form(inputs, tmp_path):
    a, b = inputs / "llama-a", inputs / "llama-b"
    config = config_from_dict("merge", {"method": "linear", "weight": [0.2, 0.7]})
    whole = [SliceSource(a, (0, 6)), SliceSource(b, (0, 6), {"weight": 0.4})]
    merge_slices(None, [MergeSlice(whole)], config, tmp_path / "sliced", progress=False)
    merge(None, [a, {"model": b, "parameters": {"weight": 0.4}}], config, tmp_path / "models", progress=False)
    sliced, models = _weights(tmp_path / "sliced"), _weights(tmp_path / "models")
    assert sliced.keys() == models.keys()
    for name, tensor in models.items():
        assert torch.equal(sliced[name], tensor), name


def test_layer_range_under_models_is_refused_as_mergekit_ignores_it(inputs):
    # mergekit merged every layer of the model for layer_range [2, 4] (the manifest records its output).
    assert MANIFEST["models_form_layer_range"]["num_hidden_layers"] == 6
    with pytest.raises(WeightkitError, match=r"models\[0\].layer_range: mergekit ignores layer_range"):
        merge_recipe_from_dict(make.resolve(make.MODELS_FORM_LAYER_RANGE, inputs))


# -- refused by name -----------------------------------------------------------------------------------------


def _passthrough(*slices: list[dict], **top) -> dict:
    return {"slices": [{"sources": sources} for sources in slices], "merge_method": "passthrough", **top}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"slices": [{"sources": [{"model": "llama-a", "layer_range": [0, 2]}], "residual_weight": 0.5}]},
            r"slices\[0\].residual_weight is not supported: mergekit reads it but never applies it",
        ),
        ({"modules": {"text": {}}}, "modules .* are not supported"),
        ({"tokenizer": {"source": "union"}}, r"tokenizer \(mergekit's section .*\) is not supported"),
        ({"tokenizer_source": "union"}, "tokenizer_source: 'union' is not supported"),
        ({"tokenizer_source": "llama-b"}, "tokenizer_source: '.*llama-b' is not supported"),
        (
            {"slices": [{"sources": [{"model": "llama-a", "layer_range": [0]}]}]},
            r"slices\[0\].sources\[0\].layer_range: expected \[start, end\]",
        ),
        (
            {"slices": [{"sources": [{"model": "llama-a"}]}]},
            r"slices\[0\].sources\[0\]: expected \{model: path, layer_range",
        ),
        ({"slices": [{"sources": [], "parameters": {}}]}, r"slices\[0\].sources: expected a list"),
        ({"slices": [{"sources": [{"model": "llama-a", "layer_range": [0, 1]}], "x": 1}]}, "unknown key"),
    ],
)
def test_recipe_keys_weightkit_does_not_implement_are_refused_by_name(inputs, doc, message):
    recipe = {**_passthrough([{"model": "llama-a", "layer_range": [0, 2]}]), **doc}
    with pytest.raises(WeightkitError, match=message):
        merge_recipe_from_dict(make.resolve(recipe, inputs))


A = {"model": "llama-a", "layer_range": [0, 2]}
B = {"model": "llama-b", "layer_range": [0, 2]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_passthrough([A, B]), r"slices\[0\]: passthrough merges exactly 1 model\(s\), got 2"),
        (_passthrough([{**A, "layer_range": [3, 2]}]), r"\[3, 2\] is not a range of layers"),
        (_passthrough([{**A, "layer_range": [4, 7]}]), r"\[4, 7\] goes beyond the 6 layers of .*llama-a"),
        (_passthrough([A], [{**B, "model": "gpt2-a"}]), "different architectures"),
        (
            {"slices": [{"sources": [A, {**B, "layer_range": [0, 3]}]}], "merge_method": "linear"},
            r"slices\[0\]: every source must give the same number of layers, got \[2, 3\]",
        ),
        (
            {"slices": [{"sources": [A, {**A, "layer_range": [2, 4]}]}], "merge_method": "linear"},
            r"slices\[0\]: .*llama-a is a source twice",
        ),
        (
            {"slices": [{"sources": [B]}], "merge_method": "ties", "base_model": "llama-a"},
            r"slices\[0\]: the base model .*llama-a is not among the slice's sources",
        ),
        (
            {"slices": [{"sources": [A]}, {"sources": [A, B]}], "merge_method": "linear"},
            r"slices\[1\] has 2 sources and slices\[0\] 1: mergekit merges the tensors after the layers",
        ),
        (
            {
                "slices": [{"sources": [A, B]}, {"sources": [A, B]}],
                "merge_method": "ties",
                "base_model": "llama-a",
                "parameters": {"scope": "model"},
            },
            "scope 'model' takes statistics over the whole model",
        ),
        (
            {"slices": [{"sources": [A, B], "parameters": {"t": 0.5}}], "merge_method": "linear"},
            r"slices\[0\]: parameters: unknown option\(s\) t \(options: weight, normalize\)",
        ),
        (
            {"slices": [{"sources": [A, {**B, "parameters": {"density": 0.5}}]}], "merge_method": "linear"},
            r"slices\[0\]: linear: unknown parameter\(s\) density for model .*llama-b",
        ),
    ],
)
def test_slices_mergekit_refuses_or_weightkit_would_misread_are_refused(inputs, tmp_path, doc, message):
    with pytest.raises(WeightkitError, match=message):
        _run(make.resolve(doc, inputs), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_several_stacks_of_layers_are_refused_by_name():
    names = ["model.layers.0.mlp.up_proj.weight", "vision_tower.blocks.0.attn.weight", "lm_head.weight"]
    with pytest.raises(
        WeightkitError, match=r"several stacks of layers \(model.layers., vision_tower.blocks.\)"
    ):
        layer_count(names, Path("vlm"))
    assert layer_count(names[:1] + ["model.layers.5.mlp.up_proj.weight"], Path("llm")) == 6


def test_the_layer_count_is_written_under_the_configs_own_key():
    assert layer_count_update({"num_hidden_layers": 4}, 4, 7, Path("m")) == {"num_hidden_layers": 7}
    assert layer_count_update({"n_layer": 4, "vocab_size": 4}, 4, 2, Path("m")) == {"n_layer": 2}
    with pytest.raises(WeightkitError, match="has no num_hidden_layers or n_layer equal to its 4 layers"):
        layer_count_update({"num_layers": 4}, 4, 7, Path("m"))
    # transformers checks layer_types against the layer count (mergekit fails on a Qwen2 frankenmerge).
    with pytest.raises(WeightkitError, match="gives layer_types for 4 layers and the merged model has 6"):
        layer_count_update({"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4}, 4, 6, Path("m"))
    four = {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4}
    assert layer_count_update(four, 4, 4, Path("m")) == {"num_hidden_layers": 4}


def test_a_nan_in_a_slices_input_is_named_and_nothing_is_written(inputs, tmp_path):
    broken = tmp_path / "broken"
    make.build_inputs(tmp_path / "copy")
    (tmp_path / "copy" / "llama-b").rename(broken)
    weights = _weights(broken)
    weights["model.layers.3.mlp.up_proj.weight"][1, 2] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    slices = [
        MergeSlice([SliceSource(inputs / "llama-a", (0, 2))]),
        MergeSlice([SliceSource(broken, (2, 5))]),
    ]
    config = config_from_dict("merge", {"method": "passthrough"})
    with pytest.raises(WeightkitError, match=r"model.layers.3.mlp.up_proj.weight of .*broken contains 1 NaN"):
        merge_slices(None, slices, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# -- tokenizer_source: base ----------------------------------------------------------------------------------


def test_tokenizer_source_base_refuses_a_model_whose_tokenizer_numbers_tokens_otherwise(inputs, tmp_path):
    other = tmp_path / "other"
    make.build_inputs(tmp_path / "copy")
    (tmp_path / "copy" / "llama-b").rename(other)
    vocabulary = json.loads((other / "tokenizer.json").read_text())["model"]["vocab"]
    first, second = sorted(vocabulary, key=vocabulary.get)[5:7]
    vocabulary[first], vocabulary[second] = vocabulary[second], vocabulary[first]
    document = json.loads((other / "tokenizer.json").read_text())
    document["model"]["vocab"] = vocabulary
    (other / "tokenizer.json").write_text(json.dumps(document))
    recipe = make.resolve(make.RECIPES["linear_tokenizer_base"], inputs)
    recipe["models"][1]["model"] = str(other)
    with pytest.raises(WeightkitError, match=r"the tokenizer of .*other gives 2 token\(s\) .* another id"):
        _run(recipe, tmp_path / "out")


def test_tokenizer_source_base_takes_a_model_without_tokenizer_as_the_references(inputs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in ("config.json", "model.safetensors"):
        (bare / file).write_bytes((inputs / "llama-b" / file).read_bytes())
    recipe = make.resolve(make.RECIPES["linear_tokenizer_base"], inputs)
    recipe["models"][1]["model"] = str(bare)
    _run(recipe, tmp_path / "out")
    expected = load_file(FIXTURES / "slices" / "linear_tokenizer_base.safetensors")
    torch.testing.assert_close(_weights(tmp_path / "out")["lm_head.weight"], expected["lm_head.weight"])


def test_tokenizer_source_base_refuses_a_tokenizer_longer_than_the_vocabulary(inputs, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for file in inputs.joinpath("llama-a").iterdir():
        (small / file.name).write_bytes(file.read_bytes())
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 32}))
    weights = {k: v[:32] if v.shape[0] == 48 else v for k, v in _weights(small).items()}
    save_file(weights, small / "model.safetensors", metadata={"format": "pt"})
    recipe = {"models": [{"model": str(small)}], "merge_method": "passthrough", "tokenizer_source": "base"}
    with pytest.raises(WeightkitError, match="has 40 tokens, more than its vocab_size 32"):
        _run(recipe, tmp_path / "out")


# -- mergekit's rules as functions ---------------------------------------------------------------------------


def test_tensors_named_like_embeddings_come_before_the_layers():
    # mergekit's architecture definitions: pre_weights vs post_weights.
    before = [
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "embeddings.LayerNorm.weight",
        "bert.embeddings.position_ids",
        "gpt_neox.embed_in.weight",
        "model.tok_embeddings.weight",
        "transformer.word_embeddings.weight",
        "transformer.rotary_pos_emb.inv_freq",
        "model.embedding_norm.weight",
    ]
    after = [
        "model.norm.weight",
        "lm_head.weight",
        "transformer.ln_f.bias",
        "embed_out.weight",
        "gpt_neox.final_layer_norm.weight",
        "pooler.dense.weight",
        "cls.predictions.decoder.weight",
        "score.weight",
        "output.weight",
    ]
    assert [name for name in before if not before_layers(name)] == []
    assert [name for name in after if before_layers(name)] == []


def test_a_gradient_spans_each_slice_and_filters_fall_through():
    assert [slice_position(i, 3) for i in range(3)] == [0.0, 0.5, 1.0]
    assert slice_position(0, 1) == 1.0
    assert value_at([0.1, 0.5, 0.9], "model.layers.7.mlp.up_proj.weight", slice_position(1, 3)) == 0.5
    own = [{"filter": "mlp", "value": 2.0}]
    assert fall_back(own, 0.3) == [*own, {"value": 0.3}]
    assert value_at(fall_back(own, [{"filter": "self_attn", "value": 0.3}]), "model.norm.weight", 0.0) is None
    assert fall_back(0.7, 0.3) == 0.7 and fall_back(own, None) == own


def test_layer_names_move_between_layers_of_one_stack():
    assert with_layer_index("model.layers.3.mlp.up_proj.weight", 11) == "model.layers.11.mlp.up_proj.weight"
    assert with_layer_index("transformer.h.0.attn.c_attn.bias", 5) == "transformer.h.5.attn.c_attn.bias"
    assert layer_stack("transformer.h.0.attn.c_attn.bias") == "transformer.h."
    assert layer_stack("lm_head.weight") is None
