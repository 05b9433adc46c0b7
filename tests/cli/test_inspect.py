"""``weightkit inspect`` (weightkit.cli.inspect) as a command: --json rows, the report directory, --help,
and bad input (corrupt, quantized, an output that must not be replaced) with a non-zero exit."""

import json

import pytest
import torch
from safetensors.torch import save_file

from weightkit.checkpoint import CheckpointReader
from weightkit.cli import main
from weightkit.inspect.metrics import matrix_metrics
from weightkit.progress import results


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_prints_one_row_per_tensor_with_the_metrics_of_each_matrix(tmp_path, capsys, llama_dir):
    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--json", "--device", "cpu", "--spectra", "1"
    )
    assert code == 0
    rows = json.loads(out)  # stdout holds the JSON alone
    with CheckpointReader(llama_dir) as reader:
        assert [row["name"] for row in rows] == reader.names()
        for row in rows:
            tensor = reader.get(row["name"])
            if tensor.dim() == 2:
                expected = matrix_metrics(tensor)
                assert {k: row[k] for k in expected} == pytest.approx(expected)
            else:
                assert "not a matrix" in row["skipped"]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == rows
    assert (tmp_path / "r" / "report.html").stat().st_size > 0


def test_the_table_shows_names_metrics_and_skip_reasons(tmp_path, capsys, llama_dir, monkeypatch):
    monkeypatch.setattr(results, "_width", 200)  # a wide terminal: no cell wraps
    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--device", "cpu", "--spectra", "1"
    )
    assert code == 0
    assert "model.layers.0.mlp.down_proj.weight" in out and "stable_rank" in out
    assert "1-D (a bias or a norm's scale), not a matrix" in out and "report written to" in out


def test_help_explains_every_column_matrix_metrics_returns(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = capsys.readouterr().out
    columns = ["name", "shape", "dtype", "skipped", *matrix_metrics(torch.randn(8, 6))]
    assert [c for c in columns if c not in text] == []
    for option in ("--json", "--device", "--allow-pickle", "--force", "--spectra", "-o"):
        assert option in text


def test_a_corrupt_checkpoint_exits_non_zero_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    save_file({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    code, out, err = run(capsys, "inspect", path, "-o", tmp_path / "r", "--device", "cpu")
    assert code == 1 and out == ""
    assert "broken.safetensors is corrupt or truncated" in " ".join(err.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]


def test_a_quantized_checkpoint_is_refused(tmp_path, capsys, quantized_llama_dir):
    code, _, err = run(capsys, "inspect", quantized_llama_dir, "-o", tmp_path / "r", "--device", "cpu")
    assert code == 1 and "is a quantized checkpoint" in " ".join(err.split())
    assert not (tmp_path / "r").exists()


def test_an_existing_report_is_replaced_only_with_force(tmp_path, capsys, llama_dir):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.json").write_text("[]")
    code, _, err = run(capsys, "inspect", llama_dir, "-o", out, "--device", "cpu", "--spectra", "0")
    assert code == 1 and "pass --force" in err and (out / "metrics.json").read_text() == "[]"
    code, _, _ = run(capsys, "inspect", llama_dir, "-o", out, "--device", "cpu", "--spectra", "0", "--force")
    assert code == 0 and len(json.loads((out / "metrics.json").read_text())) > 0
    assert not [p for p in (out / "plots").iterdir() if p.name.startswith("spectrum_")]  # --spectra 0


def test_inspect_starts_without_importing_transformers():
    # `weightkit inspect` skips transformers' import (cli._WITHOUT_TRANSFORMERS): it reads tensors, not
    # models. A module of the report that imports transformers (or weightkit.models) at the top undoes that.
    import subprocess
    import sys

    code = (
        "import sys, weightkit.cli, weightkit.cli.inspect, weightkit.inspect.report; "
        "sys.exit('transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_inspect_lets_openmp_threads_sleep(tmp_path):
    # Spinning OpenMP threads between inspect's many short SVDs doubled its time on a busy machine.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = (
        "import os, sys; from weightkit.cli import main; code = main(sys.argv[1:]); "
        "print(code, os.environ.get('OMP_WAIT_POLICY'))"
    )
    missing = tmp_path / "missing"
    cmd = [sys.executable, "-c", code, "inspect", str(missing), "-o", str(tmp_path / "r"), "--device", "cpu"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["1", "PASSIVE"]  # 1: the missing model is refused after the policy is set
