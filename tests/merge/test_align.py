"""Tests for weightkit.merge.align: the transformer specs by the exact symmetry they claim (a permuted tiny
model of every supported architecture computes the same outputs) and by recovering a known permutation;
align_checkpoint end to end.
"""

import json
import math
import shutil

import pytest
import torch
from architectures import ALIGNED
from permutations import assert_states_equal, loaded_copy, random_perms, shapes_of, take_rows
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from weightkit.arch import model_task
from weightkit.errors import WeightkitError
from weightkit.merge.align import align_checkpoint, transformer_blocks, transformer_spec
from weightkit.merge.rebasin import apply_permutation, weight_matching
from weightkit.testing import model_output, save_tiny, tiny_bert, tiny_llama, tiny_model, tiny_tokenizer

# -- helpers -------------------------------------------------------------------------------------------


# -- transformer blocks --------------------------------------------------------------------------------


def test_llama_block_spec_permutes_kv_heads_with_their_query_groups_and_mlp_neurons():
    model = tiny_llama()
    blocks = transformer_blocks(model.config.to_dict(), shapes_of(model))
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    spec = blocks["model.layers.1"]
    heads, mlp = "model.layers.1.heads", "model.layers.1.mlp"
    assert spec.sizes == {heads: 2, mlp: 64}
    attn, ff = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert spec.axes == {
        f"{attn}q_proj.weight": (heads, None),
        f"{attn}k_proj.weight": (heads, None),
        f"{attn}v_proj.weight": (heads, None),
        f"{attn}o_proj.weight": (None, heads),
        f"{ff}gate_proj.weight": (mlp, None),
        f"{ff}up_proj.weight": (mlp, None),
        f"{ff}down_proj.weight": (None, mlp),
    }
    # No residual-stream tensor is touched.
    assert not any("norm" in name or "embed" in name or "lm_head" in name for name in spec.axes)


def test_permuted_tiny_llama_with_gqa_gives_the_same_logits_and_matching_recovers_it():
    model = tiny_llama(seed=0)
    config = model.config.to_dict()
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    spec = transformer_spec(config, shapes_of(model))
    state = model.state_dict()
    perms = random_perms(spec, seed=7)
    permuted = apply_permutation(state, spec, perms)

    # Plain reference for the GQA layout: kv head j owns query heads 2j, 2j+1 (16 rows of q, 8 of k).
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    head_perm = perms["model.layers.0.heads"]
    torch.testing.assert_close(permuted[q], take_rows(state[q], head_perm, 16), rtol=0, atol=0)
    torch.testing.assert_close(permuted[k], take_rows(state[k], head_perm, 8), rtol=0, atol=0)

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        actual = loaded_copy(model, permuted)(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    found = weight_matching(state, permuted, spec)
    assert_states_equal(apply_permutation(permuted, spec, found), state)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_permuted_tiny_bert_gives_the_same_outputs_and_matching_recovers_it(with_prefix):
    if with_prefix:  # task models store the encoder under "bert."
        torch.manual_seed(0)
        fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        model = BertForSequenceClassification(BertConfig(vocab_size=128, **fields)).eval()
    else:  # BertModel and sentence-transformers checkpoints have no prefix
        model = tiny_bert(seed=0)
    config = model.config.to_dict()
    spec = transformer_spec(config, shapes_of(model))
    prefix = "bert." if with_prefix else ""
    heads = f"{prefix}encoder.layer.1.heads"
    assert spec.axes[f"{prefix}encoder.layer.1.attention.self.query.bias"] == (heads,)
    assert spec.axes[f"{prefix}encoder.layer.1.attention.output.dense.weight"] == (None, heads)
    state = model.state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, seed=2))

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
        actual = loaded_copy(model, permuted)(input_ids=ids, attention_mask=mask)
    key = "logits" if with_prefix else "last_hidden_state"
    torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)

    found = weight_matching(state, permuted, spec)
    assert_states_equal(apply_permutation(permuted, spec, found), state)


def tiny_variant(family):
    """A tiny model of another supported family (or Llama with biases), seeded."""
    torch.manual_seed(0)
    fields = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    if family == "llama-bias":
        return tiny_llama(seed=0, attention_bias=True, mlp_bias=True)
    if family == "qwen2":  # q/k/v biases, no o bias
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **fields)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(num_key_value_heads=1, **fields)).eval()
    return RobertaModel(RobertaConfig(**fields)).eval()


@pytest.mark.parametrize("family", ["llama-bias", "qwen2", "mistral", "roberta"])
def test_other_supported_families_keep_their_outputs_under_permutation(family):
    model = tiny_variant(family)
    spec = transformer_spec(model.config.to_dict(), shapes_of(model))
    if family in ("llama-bias", "qwen2"):
        assert "model.layers.1.self_attn.k_proj.bias" in spec.axes
    state = model.state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, seed=1))
    ids = torch.randint(5, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model(ids)[0], loaded_copy(model, permuted)(ids)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert_states_equal(apply_permutation(permuted, spec, weight_matching(state, permuted, spec)), state)


def test_transformer_spec_refuses_configs_that_do_not_describe_the_weights():
    model = tiny_llama(seed=0)
    config, shapes = model.config.to_dict(), shapes_of(model)
    with pytest.raises(WeightkitError, match="does not support model_type 'olmo2'"):
        transformer_spec({**config, "model_type": "olmo2"}, shapes)
    # Two KV heads stored, four claimed: the k_proj shape gives it away.
    with pytest.raises(WeightkitError, match="k_proj.weight has shape"):
        transformer_spec({**config, "num_key_value_heads": 4}, shapes)
    with pytest.raises(WeightkitError, match="not a multiple of num_key_value_heads"):
        transformer_spec({**config, "num_key_value_heads": 3}, shapes)
    with pytest.raises(WeightkitError, match="down_proj.weight is missing"):
        transformer_spec(config, {k: v for k, v in shapes.items() if "layers.1.mlp.down" not in k})
    with pytest.raises(WeightkitError, match="up_proj.weight has shape"):
        transformer_spec(config, {**shapes, "model.layers.0.mlp.up_proj.weight": (63, 32)})
    with pytest.raises(WeightkitError, match="cannot find the bert blocks"):
        transformer_spec(tiny_bert().config.to_dict(), shapes)
    with pytest.raises(
        WeightkitError, match="q_proj.weight_scale belongs to a layer that alignment permutes"
    ):
        transformer_spec(config, {**shapes, "model.layers.0.self_attn.q_proj.weight_scale": (32, 1)})
    # A bias the config does not declare is permuted with its rows all the same: it can never stay behind.
    spec = transformer_spec(config, {**shapes, "model.layers.0.self_attn.q_proj.bias": (32,)})
    assert spec.axes["model.layers.0.self_attn.q_proj.bias"] == ("model.layers.0.heads",)


# -- every supported architecture, end to end ----------------------------------------------------------

# What each architecture's blocks get: a head permutation, an MLP neuron permutation (module docstring).
ARCHITECTURES = ALIGNED


def _outputs(directory):
    """The tiny model saved in ``directory``, loaded with transformers, on fixed inputs of its task."""
    config = json.loads((directory / "config.json").read_text())
    model = type(tiny_model(config["model_type"])).from_pretrained(directory, local_files_only=True).eval()
    return model_output(model, model_task(config))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_align_recovers_a_permuted_copy_and_keeps_the_function_of_every_architecture(architecture, tmp_path):
    reference = save_tiny(tiny_model(architecture, seed=0), tmp_path / "reference")
    weights = load_file(reference / "model.safetensors")  # checkpoint names (ViT's differ from the model's)
    shapes = {name: tuple(t.shape) for name, t in weights.items()}
    spec = transformer_spec(json.loads((reference / "config.json").read_text()), shapes)
    kinds = {perm.rpartition(".")[2] for perm in spec.sizes}
    assert kinds == set(ARCHITECTURES[architecture])
    permuted = apply_permutation(weights, spec, random_perms(spec, seed=3))
    assert all(not torch.equal(permuted[name], weights[name]) for name in spec.axes if "bias" not in name)
    shuffled = tmp_path / "shuffled"
    shutil.copytree(reference, shuffled)
    save_file(permuted, shuffled / "model.safetensors", metadata={"format": "pt"})
    # The permutations are symmetries: the shuffled copy computes what the reference does ...
    torch.testing.assert_close(_outputs(shuffled), _outputs(reference), rtol=1e-5, atol=1e-5)

    # ... and aligning it to the reference recovers the reference's weights, every permuted tensor included.
    align_checkpoint(reference, shuffled, tmp_path / "aligned", progress=False)
    aligned = load_file(tmp_path / "aligned" / "model.safetensors")
    assert aligned.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(aligned[name], weights[name], rtol=0, atol=1e-6)

    # A model from another seed is aligned by some non-trivial permutation and keeps its function.
    other = save_tiny(tiny_model(architecture, seed=1), tmp_path / "other")
    summary = align_checkpoint(reference, other, tmp_path / "other-aligned", progress=False)
    assert any((row["mlp_moved"] or 0) + (row["heads_moved"] or 0) > 0 for row in summary["layers"])
    torch.testing.assert_close(_outputs(tmp_path / "other-aligned"), _outputs(other), rtol=1e-5, atol=1e-5)


# -- align_checkpoint ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Two tiny Llamas (GQA) from different seeds, saved with a tokenizer."""
    root = tmp_path_factory.mktemp("rebasin")
    tokenizer = tiny_tokenizer(128)
    reference = save_tiny(tiny_llama(seed=0), root / "reference", tokenizer)
    model = save_tiny(tiny_llama(seed=1), root / "model", tokenizer)
    return reference, model


def logits_of(directory, ids):
    model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        return model(ids).logits


def test_align_checkpoint_keeps_the_function_and_raises_the_similarity(llama_pair, tmp_path):
    reference, model = llama_pair
    out = tmp_path / "aligned"
    summary = align_checkpoint(reference, model, out, progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(out, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert [row["block"] for row in summary["layers"]] == ["model.layers.0", "model.layers.1"]
    for row in summary["layers"]:
        assert row["objective_after"] > row["objective_before"]
        assert row["cosine_after"] > row["cosine_before"]
        assert 0 < row["mlp_moved"] <= 1 and 0 <= row["heads_moved"] <= 1
    written, original = load_file(out / "model.safetensors"), load_file(model / "model.safetensors")
    assert written.keys() == original.keys() and summary["tensors"] == len(original)
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"):
        assert torch.equal(written[name], original[name])


def test_align_checkpoint_undoes_a_known_permutation(llama_pair, tmp_path):
    reference, _ = llama_pair
    ref_model = LlamaForCausalLM.from_pretrained(reference, local_files_only=True).eval()
    spec = transformer_spec(ref_model.config.to_dict(), shapes_of(ref_model))
    shuffled = loaded_copy(ref_model, apply_permutation(ref_model.state_dict(), spec, random_perms(spec, 4)))
    shuffled_dir = save_tiny(shuffled, tmp_path / "shuffled")
    summary = align_checkpoint(reference, shuffled_dir, tmp_path / "out", progress=False)
    assert_states_equal(
        load_file(tmp_path / "out" / "model.safetensors"), load_file(reference / "model.safetensors")
    )
    for row in summary["layers"]:
        assert row["heads_moved"] == 1.0 and row["mlp_moved"] > 0.9  # 2 heads: any non-identity moves both
        assert math.isclose(row["cosine_after"], 1.0, rel_tol=1e-6)


def test_align_checkpoint_of_bert_keeps_hidden_states(bert_dir, tmp_path):
    model_dir = save_tiny(tiny_bert(seed=1), tmp_path / "bert1", tiny_tokenizer(128, kind="encoder"))
    out = tmp_path / "aligned"
    align_checkpoint(bert_dir, model_dir, out, progress=False)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    outputs = []
    for directory in (model_dir, out):
        model = type(tiny_bert()).from_pretrained(directory, local_files_only=True).eval()
        with torch.no_grad():
            outputs.append(model(ids).last_hidden_state)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_align_checkpoint_refuses_an_existing_out_dir_unless_told(llama_pair, tmp_path):
    reference, model = llama_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(WeightkitError, match="exists"):
        align_checkpoint(reference, model, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"
    align_checkpoint(reference, model, out, overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file()


def test_align_checkpoint_fills_config_defaults_before_comparing(llama_pair, tmp_path):
    # A config.json that leaves head_dim out describes the same shapes as one that spells it out.
    reference, _ = llama_pair
    model = save_tiny(tiny_llama(seed=1), tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.pop("head_dim", None)
    (model / "config.json").write_text(json.dumps(config))
    align_checkpoint(reference, model, tmp_path / "out", progress=False)
    assert "head_dim" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_align_checkpoint_refuses_mismatched_or_unsupported_models(llama_pair, tmp_path):
    reference, _ = llama_pair
    deeper = save_tiny(tiny_llama(seed=1, num_hidden_layers=3), tmp_path / "deeper")
    with pytest.raises(WeightkitError, match="num_hidden_layers differs"):
        align_checkpoint(reference, deeper, tmp_path / "out", progress=False)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=32))
    with pytest.raises(WeightkitError, match="different architectures"):
        align_checkpoint(reference, save_tiny(gpt2, tmp_path / "gpt2"), tmp_path / "out", progress=False)
    # OLMo 2 has a layout, but its q_norm/k_norm span every head: refused until handled.
    olmo2 = [save_tiny(tiny_model("olmo2", seed), tmp_path / f"olmo2-{seed}") for seed in (0, 1)]
    with pytest.raises(WeightkitError, match="does not support model_type 'olmo2'"):
        align_checkpoint(*olmo2, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


class _Stop(Exception):
    """Raised by a spy once it has seen what it looks for."""


def test_align_checkpoint_matches_on_the_device_asked(llama_pair, tmp_path, monkeypatch):
    import weightkit.merge.align as align

    seen = []

    def spy(reference, other, spec, **kwargs):
        seen.extend({t.device.type for t in [*reference.values(), *other.values()]})
        raise _Stop

    monkeypatch.setattr(align, "weight_matching", spy)
    with pytest.raises(_Stop):
        align_checkpoint(*llama_pair, tmp_path / "out", progress=False, device="meta")
    assert seen == ["meta"]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_align_checkpoint_on_cuda_matches_the_cpu(llama_pair, tmp_path):
    gpu = align_checkpoint(*llama_pair, tmp_path / "gpu", progress=False, device="cuda")
    cpu = align_checkpoint(*llama_pair, tmp_path / "cpu", progress=False, device="cpu")
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert_states_equal(
        load_file(tmp_path / "gpu" / "model.safetensors"), load_file(tmp_path / "cpu" / "model.safetensors")
    )
