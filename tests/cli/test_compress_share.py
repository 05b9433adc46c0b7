"""``weightkit compress --method dictionary|foldgpt`` as a user runs it: bad input refused with one message
and nothing written; the saved models read back (weightkit.load, or plain transformers after removal only)
with the in-memory result."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightkit import load
from weightkit.checkpoint import CheckpointReader
from weightkit.cli import main
from weightkit.compress import DictionaryConfig, FoldGPTConfig, compress
from weightkit.models import load_model
from weightkit.quantized.shared import SharedLinear
from weightkit.testing import save_tiny, tiny_llama, tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
CALIBRATION = ["--calib-samples", "8", "--seq-len", "64"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory):
    """A saved 4-layer tiny Llama with a tokenizer."""
    model = tiny_llama(seed=0, num_hidden_layers=4)
    return save_tiny(model, tmp_path_factory.mktemp("llama4") / "model", tiny_tokenizer(128))


def _in_memory(model_dir, config, text_file=None):
    model, tokenizer, _ = load_model(model_dir)
    data = None if text_file is None else str(text_file)
    return compress(model, config, data=data, tokenizer=tokenizer, progress=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "dictionary", "--atoms", "4"], "atoms must be fewer than the 4 blocks of model.layers"),
        (["--method", "dictionary", "--atoms", "0"], "--atoms must be at least 1, got 0"),
        (["--method", "foldgpt", "--drop", "4"], "drop must be fewer than the model's 4 blocks"),
        (
            ["--method", "foldgpt", "--drop", "2", "--share", "3"],
            "share must be between 1 and the 2 blocks kept",
        ),
        (["--method", "foldgpt", "--drop", "0", "--share", "1"], "would leave the model as it is"),
        (["--method", "foldgpt", "--atoms", "2"], "--atoms applies to --method dictionary only, not foldgpt"),
        (["--method", "dictionary", "--bits", "4"], "--bits applies to --method"),
        (["--method", "dictionary", "--steps", "4"], "--steps applies to --method flexround or foldgpt only"),
        (["--method", "foldgpt", "--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["--method", "foldgpt", "--group-size", "32"], "--group-size applies to --method"),
        (["--method", "dictionary", "--calib", "x.txt"], "DICTIONARY uses no calibration data"),
        (["--method", "dictionary", "--sweep", "atoms=1,2"], "--method dictionary cannot be swept"),
    ],
)
def test_bad_input_gets_one_message_and_writes_nothing(tmp_path, capsys, llama4_dir, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama4_dir, "-o", out, *argv)
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert message in " ".join(err.split())  # rich wraps long lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    ("model_type", "method", "message"),
    [
        (
            "gpt2",
            "dictionary",
            "'gpt2' fuses query, key and value into one layer (attn.c_attn) stored as GPT-2",
        ),
        ("gpt2", "foldgpt", "does not know how to remove blocks from a 'gpt2' config"),
    ],
)
def test_an_architecture_it_cannot_handle_is_refused_by_name(tmp_path, capsys, model_type, method, message):
    model_dir = save_tiny(tiny_model(model_type), tmp_path / "model", tiny_tokenizer(128))
    flags = CALIBRATION if method == "foldgpt" else []
    code, _, err = run(capsys, "compress", model_dir, "-o", tmp_path / "out", "--method", method, *flags)
    assert code == 1 and message in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_dictionary_output_reads_back_with_its_atoms_tied(tmp_path, capsys, llama4_dir):
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "compress", llama4_dir, "-o", out, "--method", "dictionary", "--atoms", "2", "--json"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["config"] == {"method": "dictionary", "atoms": 2, "projections": ["q", "k", "v", "o"]}
    assert summary["size_after_bytes"] < summary["size_before_bytes"]
    loaded = load(out)
    torch.testing.assert_close(_logits(loaded), _logits(_in_memory(llama4_dir, DictionaryConfig(atoms=2))))
    layers = loaded.model.layers
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shared = [getattr(block.self_attn, projection) for block in layers]
        assert all(isinstance(s, SharedLinear) and s.atoms is shared[0].atoms for s in shared)
    with CheckpointReader(out) as reader:  # each projection's two atoms stored once, under block 0
        atoms = sorted(n for n in reader.names() if n.endswith("weight_atoms"))
    assert atoms == [
        f"model.layers.0.self_attn.{p}.weight_atoms" for p in ("k_proj", "o_proj", "q_proj", "v_proj")
    ]


def test_foldgpt_removal_only_is_a_plain_checkpoint_transformers_loads(
    tmp_path, capsys, llama4_dir, text_file
):
    out = tmp_path / "out"
    flags = ["--method", "foldgpt", "--drop", "1", "--share", "1", "--calib", text_file, *CALIBRATION]
    code, _, err = run(capsys, "compress", llama4_dir, "-o", out, *flags, "--json")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "quantization_config" not in config
    with CheckpointReader(out) as reader:
        indices = {int(n.split(".")[2]) for n in reader.names() if n.startswith("model.layers.")}
    assert indices == {0, 1, 2}
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = _in_memory(
        llama4_dir, FoldGPTConfig(drop=1, share=1, calib_samples=8, calib_max_length=64), text_file
    )
    torch.testing.assert_close(_logits(plain), _logits(expected))


def test_foldgpt_with_sharing_reads_back_as_the_in_memory_result(tmp_path, capsys, llama4_dir, text_file):
    out = tmp_path / "out"
    flags = ["--method", "foldgpt", "--drop", "1", "--share", "2", "--steps", "5", "--lr", "0.05"]
    flags += ["--calib", text_file, *CALIBRATION]
    code, _, err = run(capsys, "compress", llama4_dir, "-o", out, *flags)
    assert code == 0, err
    expected = _in_memory(
        llama4_dir,
        FoldGPTConfig(drop=1, share=2, steps=5, lr=0.05, calib_samples=8, calib_max_length=64),
        text_file,
    )
    loaded = load(out)
    assert loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(loaded), _logits(expected))
    first, second = loaded.model.layers[0], loaded.model.layers[1]
    assert second.mlp.down_proj.atoms is first.mlp.down_proj.atoms
    assert second.mlp.down_proj.coefficients.shape == (1, 32)  # a gate per output channel
