"""``weightkit inspect`` (weightkit.cli.inspect) as a command: --json rows, the report directory, --help,
and bad input (corrupt, quantized, an output that must not be replaced) with a non-zero exit."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from weightkit.checkpoint import CheckpointReader
from weightkit.cli import main
from weightkit.inspect.metrics import matrix_metrics
from weightkit.progress import results

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# -- the analyses of the options: --compare, --similarity, --hessian, --barrier, --intrinsic-dim -------------


@pytest.fixture(scope="module")
def finetunes(llama_dir, tmp_path_factory):
    """Two "fine-tunes" of llama_dir: every weight moved by seeded noise (each its own), one tensor moved
    by the same noise in both (so their task vectors agree in sign there), and an extra tensor in the
    first that the base has not."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("finetunes")
    base = load_file(llama_dir / "model.safetensors")
    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tensors = {name: t + 0.01 * torch.randn(t.shape, generator=g) for name, t in base.items()}
        shared = "model.layers.0.mlp.up_proj.weight"
        tensors[shared] = base[shared] + 0.01 * torch.randn(base[shared].shape, generator=_gen(7))
        if seed == 1:
            tensors["extra.weight"] = torch.ones(2, 2)
        out = root / f"ft{seed}"
        out.mkdir()
        save_file(tensors, out / "model.safetensors")
        (out / "config.json").write_text((llama_dir / "config.json").read_text())
        paths.append(out)
    return paths


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _report_pngs(html: str) -> list[bytes]:
    import base64
    import re

    return [base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def _assert_every_png_decodes(report_dir) -> None:
    """Every image embedded in the page is a PNG that decodes, and is the same as a file of plots/."""
    import io

    from PIL import Image

    pngs = _report_pngs((report_dir / "report.html").read_text())
    files = {p.read_bytes() for p in (report_dir / "plots").iterdir()}
    assert pngs and set(pngs) == files
    for png in pngs:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 100


def test_compare_nests_each_tensors_change_in_its_row(tmp_path, capsys, llama_dir, finetunes):
    other = finetunes[0]
    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--json", "--device", "cpu", "--spectra", "0",
        "--compare", other,
    )  # fmt: skip
    assert code == 0
    rows = json.loads(out)
    with CheckpointReader(llama_dir) as a, CheckpointReader(other) as b:
        names = a.names()
        assert [row["name"] for row in rows] == [*names, "extra.weight"]
        for row in rows[: len(names)]:
            change = row["compare"][str(other)]
            base, tuned = a.get(row["name"]).double(), b.get(row["name"]).double()
            expected = float((tuned - base).norm() / base.norm())  # a plain reference
            assert change["kind"] == "change" and change["relative_change"] == pytest.approx(
                expected, rel=1e-9
            )
            if base.dim() == 2:
                top = torch.linalg.svdvals(tuned - base)
                assert change["delta_singular_values"] == pytest.approx(top[:32].tolist(), rel=1e-6)
            assert "stable_rank" in row or "skipped" in row  # the matrix metrics stay beside it
    # The tensor only the other checkpoint has: a row with its name and that comparison alone.
    assert rows[-1]["name"] == "extra.weight" and set(rows[-1]) == {"name", "compare"}
    assert rows[-1]["compare"][str(other)]["reason"] == "absent in base"
    report = tmp_path / "r"
    assert json.loads((report / "metrics.json").read_text()) == rows
    summary = json.loads((report / "summary.json").read_text())
    assert summary["compare"][f"change:{other}"]["mismatched"] == 1
    html = (report / "report.html").read_text()
    assert (
        f"Comparison: change:{other}" in html and "delta_singular_values" not in html
    )  # a figure, not cells
    assert (report / "plots" / "compare0_delta_spectra.png").is_file()


def test_compare_with_a_weightkit_quantized_copy_gives_its_sqnr(
    tmp_path, capsys, llama_dir, quantized_llama_dir
):
    from weightkit.compress import RTNConfig
    from weightkit.quantized.grid import rtn_quantize

    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--json", "--device", "cpu", "--spectra", "0",
        "--compare", quantized_llama_dir,
    )  # fmt: skip
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    name = "model.layers.0.mlp.down_proj.weight"
    error = rows[name]["compare"][str(quantized_llama_dir)]
    with CheckpointReader(llama_dir) as reader:
        weight = reader.get(name)
    # The conftest's copy is RTN 4-bit, group 32: round the weight the same way and measure the noise.
    rounded = rtn_quantize(weight, RTNConfig(bits=4, group_size=32).scheme_for(name[: -len(".weight")]))
    noise = (weight.double() - rounded.dequantize().double()).square().sum()
    expected = 10 * math.log10(float(weight.double().square().sum() / noise))
    assert error["kind"] == "quantization" and error["bits"] == 4
    assert error["sqnr_db"] == pytest.approx(expected, abs=1e-3)
    assert rows["model.norm.weight"]["compare"][str(quantized_llama_dir)]["sqnr_db"] is None  # exact: inf
    assert (tmp_path / "r" / "plots" / "compare0_sqnr_db.png").is_file()


def test_compare_with_a_peft_lora_adapter(tmp_path, capsys, llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # a trained adapter: B is not zero
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=_gen(0)))
    peft_model.save_pretrained(tmp_path / "adapter")
    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--json", "--device", "cpu", "--spectra", "0",
        "--compare", tmp_path / "adapter",
    )  # fmt: skip
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    adapted = [name for name, row in rows.items() if "compare" in row]
    assert len(adapted) == 4 and all(".q_proj." in n or ".v_proj." in n for n in adapted)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():  # s = alpha / r = 2
        delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    values = torch.linalg.svdvals(delta.double())
    p = values / values.sum()
    numbers = rows["model.layers.1.self_attn.v_proj.weight"]["compare"][str(tmp_path / "adapter")]
    assert numbers["kind"] == "adapter" and numbers["rank"] == 4
    assert numbers["frobenius_norm"] == pytest.approx(float(delta.double().norm()), rel=1e-5)
    assert numbers["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    html = (tmp_path / "r" / "report.html").read_text()
    assert f"Comparison: adapter:{tmp_path / 'adapter'}" in html


def test_two_fine_tunes_give_task_vectors_and_every_plot_renders(tmp_path, capsys, llama_dir, finetunes):
    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--device", "cpu", "--spectra", "1",
        "--compare", *finetunes,
    )  # fmt: skip
    assert code == 0 and "compare task_vectors" in " ".join(out.split())
    report = tmp_path / "r"
    rows = {row["name"]: row for row in json.loads((report / "metrics.json").read_text())}
    with (
        CheckpointReader(llama_dir) as a,
        CheckpointReader(finetunes[0]) as b,
        CheckpointReader(finetunes[1]) as c,
    ):
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            tau_1, tau_2 = b.get(name) - a.get(name), c.get(name) - a.get(name)
            conflict = ((tau_1 > 0) & (tau_2 < 0)) | ((tau_1 < 0) & (tau_2 > 0))
            assert rows[name]["task_vectors"]["sign_conflict_rate"] == pytest.approx(
                float(conflict.double().mean())
            )
    # The tensor moved by the same noise in both agrees everywhere; independent noise conflicts about half.
    assert rows["model.layers.0.mlp.up_proj.weight"]["task_vectors"]["sign_conflict_rate"] == 0
    summary = json.loads((report / "summary.json").read_text())["compare"]["task_vectors"]
    assert summary["models"] == [str(f) for f in finetunes] and summary["cosine"][0][0] == pytest.approx(1)
    html = (report / "report.html").read_text()
    for title in (f"Comparison: change:{finetunes[0]}", f"Comparison: change:{finetunes[1]}", "task_vectors"):
        assert title in html
    assert (
        f"Sign-conflict rate over the model (raw task vectors): {summary['sign_conflict_rate']:.4g}" in html
    )
    _assert_every_png_decodes(report)


def test_ties_density_trims_the_task_vectors(tmp_path, capsys, llama_dir, finetunes):
    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--json", "--device", "cpu", "--spectra", "0",
        "--compare", *finetunes, "--ties-density", "0.1",
    )  # fmt: skip
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    name = "model.layers.1.mlp.down_proj.weight"
    with (
        CheckpointReader(llama_dir) as a,
        CheckpointReader(finetunes[0]) as b,
        CheckpointReader(finetunes[1]) as c,
    ):
        taus = torch.stack([(r.get(name) - a.get(name)).flatten() for r in (b, c)])
    keep = int(0.1 * taus.shape[1])  # TIES' trim, per task vector: its top 10% magnitudes survive
    trimmed = [tau * (tau.abs() >= tau.abs().sort(descending=True).values[keep - 1]) for tau in taus]
    conflict = ((trimmed[0] > 0) & (trimmed[1] < 0)) | ((trimmed[0] < 0) & (trimmed[1] > 0))
    assert rows[name]["task_vectors"]["sign_conflict_rate"] == pytest.approx(float(conflict.double().mean()))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())["compare"]["task_vectors"]
    assert summary["density"] == 0.1


def test_similarity_reports_weights_and_with_data_activations(tmp_path, capsys, llama_dir, texts_file):
    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--json", "--device", "cpu", "--spectra", "0",
        "--similarity", "--data", texts_file,
    )  # fmt: skip
    assert code == 0
    with CheckpointReader(llama_dir) as reader:
        assert [row["name"] for row in json.loads(out)] == reader.names()  # the rows stay one per tensor
        q0 = reader.get("model.layers.0.self_attn.q_proj.weight").double().flatten()
        q1 = reader.get("model.layers.1.self_attn.q_proj.weight").double().flatten()
    similarity = json.loads((tmp_path / "r" / "summary.json").read_text())["similarity"]
    weights = {row["role"]: row for row in similarity["weights"]}
    assert len(weights) == 7 and weights["self_attn.q_proj"]["block"] == "model.layers.0"
    assert weights["self_attn.q_proj"]["cosine"] == pytest.approx(float(q0 @ q1 / (q0.norm() * q1.norm())))
    assert [row["block"] for row in similarity["activations"]] == similarity["labels"] == [
        "model.layers.0", "model.layers.1"
    ]  # fmt: skip
    cka = torch.tensor(similarity["cka_matrix"])
    assert torch.allclose(cka, cka.T) and torch.allclose(cka.diagonal(), torch.ones(2, dtype=cka.dtype))
    assert all(c["action"] in ("drop", "share") for c in similarity["candidates"])
    html = (tmp_path / "r" / "report.html").read_text()
    for title in ("Layer similarity: activations", "Layer similarity: weights", "Redundant blocks"):
        assert title in html
    assert {p.name for p in (tmp_path / "r" / "plots").iterdir()} >= {
        "similarity_cka.png", "similarity_in_out.png", "similarity_weights.png"
    }  # fmt: skip
    # Without --data: the weights only (nothing is run).
    code, _, _ = run(capsys, "inspect", llama_dir, "-o", tmp_path / "w", "--device", "cpu", "--similarity")
    similarity = json.loads((tmp_path / "w" / "summary.json").read_text())["similarity"]
    assert code == 0 and "activations" not in similarity and len(similarity["weights"]) == 7


def test_a_refusal_of_an_analysis_is_one_clear_error(tmp_path, capsys, bert_dir):
    code, out, err = run(
        capsys, "inspect", bert_dir, "-o", tmp_path / "r", "--device", "cpu", "--hessian", "2"
    )
    assert code == 1 and out == "" and "Traceback" not in err
    assert "is a encoder model without a loss of its own" in " ".join(err.split())
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    from sample_texts import TEXTS

    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n\n".join(TEXTS[:8]))
    return path


def test_hessian_and_the_barrier_to_itself(tmp_path, capsys, llama_dir, texts_file):
    from weightkit.cli.inspect_extras import hessian_run

    code, out, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--device", "cpu", "--spectra", "0",
        "--data", texts_file, "--hessian", "2", "--barrier", llama_dir, "--align",
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    direct = hessian_run(llama_dir, texts_file, 2, "cpu")  # the same seeded run, called directly
    assert summary["hessian"]["eigenvalues"] == pytest.approx(direct["eigenvalues"], rel=1e-4)
    top = summary["hessian"]["eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1]
    barrier = summary["barrier"]
    assert barrier["before"]["barrier"] == 0 and barrier["after"]["barrier"] == pytest.approx(0, abs=1e-6)
    assert len(set(barrier["before"]["losses"])) == 1 and len(barrier["before"]["ts"]) == 11
    text = " ".join(out.split())
    assert f"Hessian: top eigenvalues {top[0]:.4g}, {top[1]:.4g}" in text
    assert "loss barrier to" in text and "after permutation alignment 0" in text
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Curvature: Hessian of the loss" in html and "Linear mode connectivity" in html
    _assert_every_png_decodes(tmp_path / "r")


def test_intrinsic_dimension_sweep(tmp_path, capsys, llama_dir, texts_file):
    code, _, _ = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--device", "cpu", "--spectra", "0",
        "--data", texts_file, "--intrinsic-dim", "256,64", "--said",
    )  # fmt: skip
    assert code == 0
    found = json.loads((tmp_path / "r" / "summary.json").read_text())["intrinsic_dimension"]
    assert found["subspace"] == "SAID" and [d for d, _ in found["curve"]] == [64, 256]
    assert [run["trainable_parameters"] for run in found["runs"]] == [64, 256]  # exactly d numbers train
    reached = [d for d, score in found["curve"] if score >= found["threshold"]]
    assert found["d90"] == (reached[0] if reached else None)
    assert found["threshold"] == pytest.approx(
        found["reference"] + 0.9 * (found["full_score"] - found["reference"])
    )
    assert "Intrinsic dimension" in (tmp_path / "r" / "report.html").read_text()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ties-density", "0.5", "--compare", "A"], "--ties-density trims the task vectors of two or more"),
        (["--ties-density", "0.5"], "--ties-density trims the task vectors of two or more"),
        (["--align"], "--align aligns the checkpoint of --barrier OTHER: it needs --barrier"),
        (["--intrinsic-dim", "8,64"], "--intrinsic-dim fine-tunes the model: it needs --data"),
        (["--said"], "--said chooses the subspace of --intrinsic-dim"),
        (["--data", "T"], "--data is used by --similarity, --hessian, --barrier and --intrinsic-dim"),
        (["--compare", "A", "A"], "a checkpoint is given twice to --compare"),
    ],
)
def test_bad_combinations_exit_1_with_one_message_and_write_nothing(
    tmp_path, capsys, llama_dir, options, message
):
    code, out, err = run(capsys, "inspect", llama_dir, "-o", tmp_path / "r", *options)
    assert code == 1 and out == ""
    assert message in " ".join(err.split()) and err.count("error:") == 1
    assert list(tmp_path.iterdir()) == []


def test_ties_density_with_one_full_checkpoint_among_others_is_refused(
    tmp_path, capsys, llama_dir, finetunes, quantized_llama_dir
):
    code, out, err = run(
        capsys, "inspect", llama_dir, "-o", tmp_path / "r", "--device", "cpu", "--spectra", "0",
        "--compare", finetunes[0], quantized_llama_dir, "--ties-density", "0.5",
    )  # fmt: skip
    assert code == 1 and out == ""
    assert "--ties-density needs two or more full checkpoints among --compare, got 1" in " ".join(err.split())
    assert not (tmp_path / "r").exists()


def test_help_documents_every_new_option(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = capsys.readouterr().out
    options = ("--compare", "--ties-density", "--data", "--similarity", "--hessian", "--barrier", "--align")
    assert [o for o in (*options, "--intrinsic-dim", "--said", "summary.json") if o not in text] == []
