"""``weightkit compress --method svd|welore`` and ``weightkit export --dense`` as a user runs them: the flags
reach the configs, bad input gets one message and writes nothing, and the dense export loads in transformers
with the outputs weightkit.load gives the compressed checkpoint."""

import json

import pytest
import torch
import transformers

import weightkit
from weightkit.cli import main
from weightkit.compress import SVDConfig, WeLoreConfig, compress
from weightkit.models import load_model
from weightkit.quantized.lowrank import LowRankLinear
from weightkit.testing import model_output

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # rich wraps long lines


@pytest.mark.parametrize(
    ("flags", "config"),
    [
        (["--method", "svd", "--ratio", "0.3"], SVDConfig(ratio=0.3)),
        (
            ["--method", "welore", "--threshold", "0.5", "--min-ratio", "0.55"],
            WeLoreConfig(0.5, min_ratio=0.55),
        ),
        (["--method", "welore", "--rank-reduction", "0.4"], WeLoreConfig(rank_reduction=0.4)),
    ],
    ids=["svd", "welore-threshold", "welore-rank-reduction"],
)
def test_the_flags_make_the_in_memory_result(tmp_path, capsys, llama_dir, flags, config):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama_dir, "-o", out, *flags, "--json")
    assert code == 0, err
    assert json.loads(stdout)["compression_ratio"] > 1
    model, _, _ = load_model(llama_dir)
    expected = compress(model, config, progress=False)
    assert torch.equal(model_output(weightkit.load(out), "causal-lm"), model_output(expected, "causal-lm"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--method", "svd", "--ratio", "0"],
            "--ratio is the fraction of the selected layers' parameters kept, in (0, 1]",
        ),
        (["--method", "svd", "--ratio", "0.02"], "the smallest ratio is 0.055556"),
        (["--method", "svd", "--ratio", "1"], "ratio 1 leaves every selected layer dense"),
        (["--method", "svd", "--bits", "4"], "--bits applies to --method"),
        (["--method", "svd", "--group-size", "32"], "--group-size applies to --method"),
        (["--method", "svd", "--threshold", "0.2"], "--threshold applies to --method ternary or welore only"),
        (["--method", "welore", "--ratio", "0.5"], "--ratio applies to --method svd only, not welore"),
        (["--method", "welore", "--threshold", "0.2", "--rank-reduction", "0.5"], "not both"),
        (["--method", "welore", "--rank-reduction", "0.99"], "a rank reduction of 0.99 is out of reach"),
        (["--method", "svd", "--calib", "x.txt"], "--calib applies to --method"),
        (["--method", "rtn,svd", "--sweep", "bits=4"], "--method svd cannot be swept"),
    ],
)
def test_bad_low_rank_input_gets_one_message_and_writes_nothing(tmp_path, capsys, llama_dir, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama_dir, "-o", out, *argv)
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["svd", "rtn"])
def test_export_dense_loads_in_transformers_with_weightkit_loads_outputs(tmp_path, capsys, llama_dir, method):
    compressed, dense = tmp_path / "compressed", tmp_path / "dense"
    flags = ["--ratio", "0.4"] if method == "svd" else ["--bits", "4", "--group-size", "32"]
    assert run(capsys, "compress", llama_dir, "-o", compressed, "--method", method, *flags)[0] == 0
    code, stdout, err = run(capsys, "export", compressed, "-o", dense, "--dense", "--json")
    assert code == 0, err
    assert json.loads(stdout)["dense_layers"] > 0
    config = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in config
    assert (dense / "tokenizer.json").is_file()
    plain = transformers.AutoModelForCausalLM.from_pretrained(dense)
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    expected = model_output(weightkit.load(compressed), "causal-lm")
    torch.testing.assert_close(model_output(plain, "causal-lm"), expected, atol=1e-5, rtol=1e-5)


def test_export_without_dense_says_what_it_does_and_writes_nothing(tmp_path, capsys, llama_dir):
    code, _, err = run(capsys, "export", llama_dir, "-o", tmp_path / "out")
    assert code == 1 and "expands a compressed checkpoint" in err and "--dense" in err
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_dense_checkpoint_is_refused(tmp_path, capsys, llama_dir):
    code, _, err = run(capsys, "export", llama_dir, "-o", tmp_path / "out", "--dense")
    assert code == 1 and "holds no compressed layer" in err
    assert list(tmp_path.iterdir()) == []
