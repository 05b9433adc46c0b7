"""Recursive Transformers (arXiv:2410.20672): the initialisations against the paper's Figure 2 and plain
references, exact reproduction at K = L and at full relax rank, error falling with the rank, stored size,
save/load round trips with tied atoms, the CLI, and bad input refused with nothing written."""

import json
import struct

import pytest
import torch
import transformers
from safetensors.torch import load_file

from weightkit import load
from weightkit.cli import main
from weightkit.compress import RecursiveConfig, compress, compress_checkpoint
from weightkit.compress.quant.export import save_quantized
from weightkit.compress.share.recursive import average_weight, residual_lora, source_layers, stepwise_layers
from weightkit.errors import WeightkitError
from weightkit.quantized.shared import SharedLinear
from weightkit.registry import config_from_dict, config_to_dict
from weightkit.testing import save_tiny, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

IDS = torch.tensor([[1, 5, 17, 33, 64, 99, 127, 3, 8, 21], [4, 9, 2, 77, 120, 6, 45, 13, 90, 31]])
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama(layers: int = 4) -> transformers.LlamaForCausalLM:
    """A tiny Llama whose linears all have rank up to 32 (4 key/value heads), so one relax rank is full
    for all of them."""
    return tiny_llama(seed=3, num_hidden_layers=layers, num_key_value_heads=4)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def recursive(model, **fields):
    return compress(model, RecursiveConfig(**fields), progress=False)


# -- the pure functions ---------------------------------------------------------------------------------


def test_stepwise_keeps_first_and_last_layer_at_regular_intervals():
    assert stepwise_layers(6, 3) == [0, 2, 5]  # the paper's Figure 2: layers 1, 3, 6 of 6
    assert stepwise_layers(18, 9) == [0, 2, 4, 6, 8, 10, 12, 14, 17]  # Gemma 2B, two loops
    assert stepwise_layers(4, 4) == [0, 1, 2, 3]
    assert stepwise_layers(5, 1) == [0]


def test_sources_follow_the_papers_figure():
    assert source_layers(6, 3, "average") == [[0, 3], [1, 4], [2, 5]]
    assert source_layers(6, 3, "stepwise") == [[0], [2], [5]]
    assert source_layers(6, 3, "lower") == [[0], [1], [2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_weight_is_the_plain_mean(dtype):
    torch.manual_seed(0)
    weights = [torch.randn(5, 3).to(dtype) for _ in range(3)]
    expected = torch.zeros(5, 3)
    for w in weights:
        expected += w.float()
    assert torch.equal(average_weight(weights), (expected / 3).to(dtype))
    assert torch.equal(average_weight(weights[:1]), weights[0])


def test_residual_lora_is_the_truncated_svd_with_fixed_signs():
    torch.manual_seed(0)
    weight, shared = torch.randn(6, 4), torch.randn(6, 4)
    singular = torch.linalg.svdvals(weight - shared)
    for rank in range(5):
        lora_a, lora_b = residual_lora(weight, shared, rank)
        assert lora_a.shape == (rank, 4) and lora_b.shape == (6, rank)
        error = torch.linalg.matrix_norm(weight - shared - lora_b @ lora_a)
        # Eckart-Young: the best rank-r error is the norm of the dropped singular values.
        torch.testing.assert_close(error, singular[rank:].square().sum().sqrt(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lora_a @ lora_a.T, torch.eye(rank), atol=1e-5, rtol=1e-5)
        largest = lora_b.gather(0, lora_b.abs().argmax(0, keepdim=True))
        assert (largest > 0).all()
    # A residual of zero (a layer its shared layer was picked from) gets B = 0.
    lora_a, lora_b = residual_lora(weight, weight, 2)
    assert not lora_b.any() and lora_a.shape == (2, 4)


# -- in memory ------------------------------------------------------------------------------------------


def test_k_equal_to_the_layer_count_reproduces_the_model_exactly():
    model = llama()
    expected = logits(model)
    recursive(model, blocks=4)
    assert torch.equal(logits(model), expected)
    assert all(
        isinstance(model.get_submodule(f"model.layers.{i}.{n}"), SharedLinear)
        for i in range(4)
        for n in LINEARS
    )


def test_k_equal_to_the_layer_count_reproduces_an_encoder_with_biases_exactly():
    model = tiny_bert(seed=2, num_hidden_layers=3)
    inputs = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        recursive(model, blocks=3, init="average")
        assert torch.equal(model(**inputs).last_hidden_state, expected)
    assert model.encoder.layer[1].attention.self.query.bias is not None


@pytest.mark.parametrize("init", ["average", "stepwise", "lower"])
def test_layer_l_runs_shared_layer_l_mod_k_initialised_as_the_paper_says(init):
    model = llama(layers=6)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    recursive(model, blocks=3, init=init)
    picks = {"stepwise": [0, 2, 5], "lower": [0, 1, 2]}
    for name in LINEARS:
        layers = [model.get_submodule(f"model.layers.{i}.{name}") for i in range(6)]
        for k in range(3):
            assert layers[k].atoms is layers[k + 3].atoms  # looped: layers k and k + K share
            assert layers[k].atoms is not layers[(k + 1) % 3].atoms
            if init == "average":  # plain reference: (W_k + W_k+3) / 2
                sources = [original[f"model.layers.{i}.{name}.weight"] for i in (k, k + 3)]
                expected = (sources[0] + sources[1]) / 2
            else:
                expected = original[f"model.layers.{picks[init][k]}.{name}.weight"]
            torch.testing.assert_close(layers[k].dense_weight(), expected, rtol=0, atol=0)
    # Norms stay per layer (the docstring's deviation).
    assert torch.equal(
        model.model.layers[4].input_layernorm.weight, original["model.layers.4.input_layernorm.weight"]
    )
    shared_count = sum(p.numel() for p in model.parameters())
    assert shared_count < sum(p.numel() for p in original.values())


def test_config_round_trips_through_a_recipe_dict():
    config = RecursiveConfig(blocks=2, init="lower", relax_rank=8, ignore=["re:.*lm_head"])
    data = config_to_dict(config)
    assert data["method"] == "recursive" and config_from_dict("compress", data) == config


def test_default_init_is_stepwise_strict_and_average_relaxed():
    assert RecursiveConfig(blocks=2).init_method == "stepwise"
    assert RecursiveConfig(blocks=2, relax_rank=4).init_method == "average"
    assert RecursiveConfig(blocks=2, relax_rank=4, init="lower").init_method == "lower"


@pytest.mark.parametrize("blocks", [1, 2])
def test_full_relax_rank_reproduces_the_outputs(blocks):
    model = llama()
    expected = logits(model)
    recursive(model, blocks=blocks, relax_rank=32)
    torch.testing.assert_close(logits(model), expected, atol=2e-5, rtol=0)


def test_error_falls_as_the_relax_rank_rises():
    original = llama()
    expected, down_proj = logits(original), original.model.layers[3].mlp.down_proj.weight.detach()
    output_errors, weight_errors = [], []
    for rank in (0, 2, 8, 16, 32):
        model = recursive(llama(), blocks=2, relax_rank=rank, init="average")
        output_errors.append((logits(model) - expected).norm().item())
        weight_errors.append((model.model.layers[3].mlp.down_proj.dense_weight() - down_proj).norm().item())
    assert output_errors == sorted(output_errors, reverse=True) and len(set(output_errors)) == 5
    assert weight_errors == sorted(weight_errors, reverse=True) and weight_errors[-1] < 1e-5
    assert output_errors[-1] < 1e-3 * output_errors[0]


def test_targets_and_ignore_leave_the_other_linears_per_layer():
    model = llama()
    recursive(model, blocks=2, ignore=["re:.*self_attn.*", "re:.*lm_head"])
    assert type(model.model.layers[2].self_attn.q_proj) is torch.nn.Linear
    assert model.model.layers[2].mlp.up_proj.atoms is model.model.layers[0].mlp.up_proj.atoms


# -- checkpoints ----------------------------------------------------------------------------------------


def tensor_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


@pytest.fixture(scope="module")
def llama6_dir(tmp_path_factory):
    return save_tiny(llama(layers=6), tmp_path_factory.mktemp("llama6") / "model", tiny_tokenizer(128))


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_strict_recursion_stores_k_of_the_l_layers_linear_weights(tmp_path, llama6_dir, blocks):
    out = compress_checkpoint(llama6_dir, tmp_path / "out", RecursiveConfig(blocks=blocks), progress=False)
    before, after = load_file(llama6_dir / "model.safetensors"), load_file(out / "model.safetensors")
    linear_bytes = sum(t.nbytes for n, t in before.items() if n.startswith("model.layers.") and "_proj" in n)
    atom_bytes = sum(t.nbytes for n, t in after.items() if n.endswith("weight_atoms"))
    assert atom_bytes * 6 == linear_bytes * blocks
    # Per tied layer: its coefficient (4 bytes) and its atom set index (8 bytes); everything else as before.
    expected = (
        tensor_bytes(llama6_dir / "model.safetensors") - linear_bytes + atom_bytes + 6 * len(LINEARS) * 12
    )
    assert tensor_bytes(out / "model.safetensors") == expected


@pytest.mark.parametrize("relax_rank", [0, 4])
def test_checkpoint_round_trip_is_bit_identical_with_tied_atoms(
    tmp_path, monkeypatch, llama6_dir, relax_rank
):
    config = RecursiveConfig(blocks=2, relax_rank=relax_rank)
    with monkeypatch.context() as patch:  # streamed: the model is never loaded whole
        patch.setattr(
            "weightkit.compress.stream._compress_whole", lambda *a, **k: pytest.fail("loaded whole")
        )
        out = compress_checkpoint(llama6_dir, tmp_path / "out", config, progress=False)
    in_memory = compress(load(llama6_dir), config, progress=False)
    loaded = load(out)
    assert torch.equal(logits(loaded), logits(in_memory))
    layers = loaded.model.layers
    assert (
        layers[1].self_attn.v_proj.atoms
        is layers[3].self_attn.v_proj.atoms
        is layers[5].self_attn.v_proj.atoms
    )
    assert layers[0].self_attn.v_proj.atoms is not layers[1].self_attn.v_proj.atoms
    assert layers[5].mlp.up_proj.rank == relax_rank
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "shared" and len(qc["atom_sets"]) == 2 * len(LINEARS)
    # save_quantized of the in-memory result writes the same tensors.
    save_quantized(in_memory, tmp_path / "saved")
    saved, streamed = load_file(tmp_path / "saved/model.safetensors"), load_file(out / "model.safetensors")
    assert saved.keys() == streamed.keys() and all(torch.equal(saved[k], streamed[k]) for k in saved)


def test_transformers_refuses_the_checkpoint_loudly(tmp_path, llama6_dir):
    out = compress_checkpoint(llama6_dir, tmp_path / "out", RecursiveConfig(blocks=3), progress=False)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        ({}, "blocks is required"),
        ({"blocks": 0}, "blocks must be a whole number of at least 1, got 0"),
        ({"blocks": 2, "relax_rank": -1}, "relax_rank must be a whole number of at least 0"),
        ({"blocks": 2, "init": "random"}, "init must be one of stepwise, average, lower, got 'random'"),
    ],
)
def test_config_refuses_bad_values(fields, match):
    with pytest.raises(WeightkitError, match=match):
        RecursiveConfig(**fields)


@pytest.mark.parametrize(
    "model, fields, match",
    [
        (llama, {"blocks": 5}, "blocks=5 is more than the 4 layers of model.layers"),
        (
            llama,
            {"blocks": 3},
            "blocks=3 does not divide the 4 layers of model.layers.*choose one of 1, 2, 4",
        ),
        (
            llama,
            {"blocks": 2, "relax_rank": 33},
            r"relax_rank=33 exceeds model.layers.0.self_attn.q_proj's \[32, 32\]",
        ),
        (
            tiny_llama,
            {"blocks": 1, "relax_rank": 17},
            r"relax_rank=17 exceeds model.layers.0.self_attn.k_proj's \[16, 32\]",
        ),
        (tiny_gpt2, {"blocks": 1}, "transformer.h.0.attn.c_attn is a transformers Conv1D"),
        (
            lambda: transformers.T5Model(
                transformers.T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=64)
            ),
            {"blocks": 1},
            "T5Model has 2 stacks of layers",
        ),
        (
            llama,
            {"blocks": 2, "ignore": ["model.layers.1.mlp.up_proj"]},
            r"model.layers.\{i\}.mlp.up_proj is selected in some layers but not in layer 1",
        ),
        (
            llama,
            {"blocks": 2, "targets": ["lm_head"], "ignore": []},
            "no linear layer of model.layers selected",
        ),
    ],
)
def test_models_and_settings_it_cannot_handle_are_refused_before_anything_changes(model, fields, match):
    model = model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(WeightkitError, match=match):
        recursive(model, **fields)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- command line ---------------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_recursive_model(tmp_path, capsys, llama6_dir):
    out = tmp_path / "out"
    argv = ("compress", llama6_dir, "-o", out, "--method", "recursive", "--blocks", "3", "--relax-rank", "2")
    code, stdout, _ = run(capsys, *argv, "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["config"] == {
        "method": "recursive",
        "blocks": 3,
        "init": None,
        "relax_rank": 2,
        "targets": ["_default"],
        "ignore": RecursiveConfig(blocks=1).ignore,
    }
    expected = compress(load(llama6_dir), RecursiveConfig(blocks=3, relax_rank=2), progress=False)
    assert torch.equal(logits(load(out)), logits(expected))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--blocks", "4"], "blocks=4 does not divide the 6 layers of model.layers"),
        (["--blocks", "7"], "blocks=7 is more than the 6 layers"),
        ([], "blocks is required"),
        (["--blocks", "0"], "--blocks must be a whole number of at least 1, got 0"),
        (["--blocks", "2", "--relax-rank", "-1"], "--relax-rank must be a whole number of at least 0"),
        (["--blocks", "2", "--group-size", "32"], "--group-size applies to --method"),
        (["--blocks", "2", "--calib", "x.txt"], "--calib applies to --method"),
        (["--sweep", "blocks=1,2"], "--method recursive cannot be swept"),
    ],
)
def test_cli_bad_input_gets_one_message_and_writes_nothing(tmp_path, capsys, llama6_dir, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama6_dir, "-o", out, "--method", "recursive", *argv)
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert message in " ".join(err.split())
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def encoder_output(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def test_streamed_encoder_with_biases_matches_the_in_memory_result(tmp_path, bert_dir):
    config = RecursiveConfig(blocks=1, relax_rank=3)
    out = compress_checkpoint(bert_dir, tmp_path / "out", config, progress=False)
    in_memory = compress(load(bert_dir), config, progress=False)
    save_quantized(in_memory, tmp_path / "saved")
    saved, streamed = load_file(tmp_path / "saved/model.safetensors"), load_file(out / "model.safetensors")
    assert saved.keys() == streamed.keys() and all(torch.equal(saved[k], streamed[k]) for k in saved)
    assert "encoder.layer.1.attention.self.query.bias" in streamed
    assert torch.equal(encoder_output(load(out)), encoder_output(in_memory))


def test_the_real_minilm_with_one_shared_layer_per_layer_is_reproduced_exactly(tmp_path):
    from weightkit.models import default_model_path

    out = compress_checkpoint(
        default_model_path(), tmp_path / "out", RecursiveConfig(blocks=6), progress=False
    )
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    assert torch.equal(encoder_output(load(out), ids), encoder_output(load(default_model_path()), ids))
