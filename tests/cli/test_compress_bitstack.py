"""``weightkit compress --method bitstack`` as a user runs it: bad flags refused with one message and nothing
written; --budget-mb caps what is stored."""

import json

import pytest

import weightkit
from weightkit.cli import main
from weightkit.quantized.bitstack import BitStackLinear


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--method", "bitstack", "--iterations", "0"],
            "--iterations must be an integer of at least 1, got 0",
        ),
        (
            ["--method", "bitstack", "--budget-mb", "-2"],
            "--budget-mb must be a positive number of MB, got -2.0",
        ),
        (["--method", "bitstack", "--rank", "17"], "vectors need both sides at least 17"),
        (["--method", "bitstack", "--group-size", "32"], "--group-size applies to --method"),
        (["--method", "bitstack", "--bits", "2"], "--bits applies to --method"),
        (["--method", "gptq", "--budget-mb", "5"], "--budget-mb applies to --method bitstack only, not gptq"),
        (["--method", "rtn", "--iterations", "4"], "--iterations applies to --method bitstack only, not rtn"),
        (["--method", "bitstack", "--budget-mb", "0.01", "--rank", "2"], "budget_mb 0.01 is less than the"),
        (
            ["--method", "gptq", "--importance", "perplexity"],
            "--importance applies to --method bitstack only",
        ),
    ],
)
def test_bad_bitstack_input_gets_one_message_and_writes_nothing(tmp_path, capsys, llama_dir, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama_dir, "-o", out, *argv, "--seq-len", "32")
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert message in " ".join(err.split())  # rich wraps long lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_budget_caps_what_is_stored(tmp_path, capsys, llama_dir, text_file):
    out = tmp_path / "out"
    argv = ["--method", "bitstack", "--iterations", "4", "--rank", "2", "--budget-mb", "0.05", "--json"]
    code, stdout, _ = run(
        capsys, "compress", llama_dir, "-o", out, *argv, "--calib", text_file, "--seq-len", "32"
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["config"]["method"] == "bitstack" and summary["config"]["budget_mb"] == 0.05
    model = weightkit.load(out)
    unique = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    assert sum(t.numel() * t.element_size() for t in unique.values()) <= 50_000
    blocks = [m.weight_stack_u.shape[0] for m in model.modules() if isinstance(m, BitStackLinear)]
    assert len(blocks) == 14 and 0 < sum(blocks) < 14 * 4  # some blocks dropped, some kept
