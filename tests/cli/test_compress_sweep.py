"""``weightkit compress --sweep`` (weightkit.cli.compress_sweep): size against quality over a grid."""

import csv
import json
import struct

import pytest
import torch
from sample_texts import TEXTS

from weightkit.cli import main
from weightkit.cli.compress_sweep import quantized_layer_bytes
from weightkit.data import tokenize_batches
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PASSAGES = sorted(set(TEXTS))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_llama_dir(tmp_path_factory):
    """A tiny Llama trained until it predicts ``PASSAGES`` well (perplexity near 1), so that quantization
    noise can only make it worse: a random one scores about its vocabulary size, and noise moves that
    either way."""
    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer(128)
    batch = tokenize_batches(tokenizer, PASSAGES, max_length=64, batch_size=len(PASSAGES))[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return save_tiny(model.eval(), tmp_path_factory.mktemp("trained") / "model", tokenizer)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text("\n\n".join(PASSAGES))
    return path


def _png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_files_agree(out, summary):
    """sweep.json is the --json summary; sweep.csv holds the same rows (reference first); the PNG is valid."""
    assert json.loads((out / "sweep.json").read_text()) == summary
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metric, param = summary["metric"], summary["parameter"]
    expected = [summary["reference"], *summary["points"]]
    assert [r["method"] for r in rows] == [r["method"] for r in expected]
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    assert [int(r["size_bytes"]) for r in rows] == [r["size_bytes"] for r in expected]
    assert [float(r[metric]) for r in rows] == [r[metric] for r in expected]
    assert rows[0][param] == "" and [r[param] for r in rows[1:]] == [
        "none" if p["value"] is None else str(p["value"]) for p in summary["points"]
    ]
    assert _png_size(out / "sweep.png") == (700, 450)


def _linear_weights(model_dir) -> tuple[int, int]:
    """How many linear layers the compressor quantizes in the tiny Llama, and their weights."""
    from weightkit.models import load_model

    model, _, _ = load_model(model_dir)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return len(linears), sum(m.weight.numel() for m in linears)


def test_rtn_bits_sweep_of_a_causal_lm(tmp_path, capsys, trained_llama_dir, eval_file):
    out = tmp_path / "sweep"
    code, stdout, _ = run(
        capsys, "compress", trained_llama_dir, "-o", out, "--method", "rtn", "--group-size", "32",
        "--sweep", "bits=2,4,8", "--eval-data", eval_file, "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary["metric"] == "perplexity" and summary["complete"] is True
    points, reference = summary["points"], summary["reference"]
    assert [(p["method"], p["value"]) for p in points] == [("rtn", 2), ("rtn", 4), ("rtn", 8)]
    assert [p["config"]["group_size"] for p in points] == [32, 32, 32]  # the flag applies to every point
    sizes = [p["size_bytes"] for p in points]
    assert sizes[0] < sizes[1] < sizes[2] < reference["size_bytes"]
    # Bits per weight, counted independently: b bits per value, one float32 scale per 32 weights, and an
    # int64 [2] weight_shape per layer.
    layers, weights = _linear_weights(trained_llama_dir)
    for point in points:
        expected = point["value"] + 32 / 32 + layers * 128 / weights
        assert point["bits_per_weight"] == pytest.approx(expected, abs=1e-4)
    assert reference["bits_per_weight"] == 32.0
    ppl = {p["value"]: p["perplexity"] for p in points}
    assert abs(ppl[8] / reference["perplexity"] - 1) < 0.01
    assert ppl[2] > 1.5 * reference["perplexity"]
    # Each point is a checkpoint `weightkit eval` reads, and scores exactly as the sweep did.
    code, stdout, _ = run(capsys, "eval", points[0]["path"], "--data", eval_file, "--json")
    assert code == 0 and json.loads(stdout)["perplexity"] == pytest.approx(ppl[2], rel=1e-9)
    _check_files_agree(out, summary)


def test_two_methods_on_one_chart_over_group_sizes(tmp_path, capsys, trained_llama_dir, eval_file):
    out = tmp_path / "sweep"
    code, stdout, _ = run(
        capsys, "compress", trained_llama_dir, "-o", out, "--method", "rtn,ternary",
        "--sweep", "group_size=16,32,none", "--eval-data", eval_file, "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary["methods"] == ["rtn", "ternary"]
    for method in ("rtn", "ternary"):
        rows = [p for p in summary["points"] if p["method"] == method]
        assert [p["value"] for p in rows] == [16, 32, None]
        assert (out / f"{method}-group_size=none" / "config.json").is_file()
        # Fewer scales, fewer bytes.
        assert rows[0]["size_bytes"] > rows[1]["size_bytes"] > rows[2]["size_bytes"]
    # Ternary stores 2 bits per weight, RTN the default 4: at equal group size it is smaller.
    rtn, ternary = summary["points"][:3], summary["points"][3:]
    assert all(t["size_bytes"] < r["size_bytes"] for r, t in zip(rtn, ternary, strict=True))
    _check_files_agree(out, summary)


def test_encoder_sweep_measures_embedding_fidelity(tmp_path, capsys, bert_dir):
    out = tmp_path / "sweep"
    code, stdout, _ = run(
        capsys, "compress", bert_dir, "-o", out, "--method", "rtn", "--group-size", "32",
        "--sweep", "bits=2,4,8", "--max-eval-texts", "8", "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary["metric"] == "embedding_fidelity" and summary["higher_is_better"] is True
    # The default evaluation text: the held-out split of the default calibration corpus.
    assert summary["eval_texts"]["count"] == 8 and "held-out" in summary["eval_texts"]["source"]
    assert summary["reference"]["embedding_fidelity"] == pytest.approx(1.0, abs=1e-6)
    fidelity = [p["embedding_fidelity"] for p in summary["points"]]
    assert fidelity[0] < fidelity[1] < fidelity[2] <= 1.0 + 1e-6
    assert fidelity[2] > 0.999
    _check_files_agree(out, summary)


def test_an_interrupted_sweep_keeps_its_finished_points(tmp_path, capsys, monkeypatch, llama_dir, eval_file):
    import weightkit.compress

    real = weightkit.compress.compress_checkpoint
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(weightkit.compress, "compress_checkpoint", interrupt_second)
    out = tmp_path / "sweep"
    code, _, _ = run(
        capsys, "compress", llama_dir, "-o", out, "--method", "rtn", "--group-size", "32",
        "--sweep", "bits=2,4,8", "--eval-data", eval_file,
    )  # fmt: skip
    assert code == 130
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] is False and [p["value"] for p in summary["points"]] == [2]
    assert sorted(p.name for p in out.iterdir()) == ["rtn-bits=2", "sweep.csv", "sweep.json"]
    stored, _, weights = quantized_layer_bytes(llama_dir, out / "rtn-bits=2")
    assert weights and 8 * stored / weights == pytest.approx(
        summary["points"][0]["bits_per_weight"], abs=1e-4
    )


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--method", "rtn", "--sweep", "bits=2,9"], ["--sweep bits=9", "--method rtn", "between 2 and 8"]),
        (["--method", "rtn", "--sweep", "bitz=2,4"], ["--method rtn has no option 'bitz'", "bits"]),
        (["--method", "rtn,fp4", "--sweep", "bits=2,4"], ["--method fp4 has no option 'bits'"]),
        (
            ["--method", "rtn", "--sweep", "bits=2,x"],
            ["--sweep bits=x", "--method rtn", "expected an integer"],
        ),
        (["--method", "rtn", "--sweep", "bits=4,04"], ["04 and 4 are the same value"]),
        (["--method", "rtn", "--sweep", "targets=a,b"], ["--sweep targets=a", "only options holding one"]),
        (["--method", "rtn", "--sweep", "bits"], ["expected OPTION=V1,V2"]),
        (["--method", "rtn", "--bits", "4", "--sweep", "bits=2,3"], ["--bits conflicts with --sweep bits"]),
        (
            ["--method", "gptq", "--seq-len", "0", "--sweep", "bits=2,4"],
            ["--seq-len must be at least 1, got 0"],
        ),
        (["--method", "rtn,fp8", "--damp", "0.1", "--sweep", "group_size=32"], ["--damp applies to"]),
        (["--method", "rtn,gptq", "--bits", "4"], ["several methods", "--sweep"]),
        (["--method", "rtn", "--eval-data", "x.txt"], ["--eval-data applies to --sweep only"]),
        (["--method", "rtn", "--max-eval-texts", "4"], ["--max-eval-texts applies to --sweep only"]),
        (["--method", "rtn", "--sweep", "bits=2", "--max-eval-texts", "0"], ["--max-eval-texts must be"]),
        (["--recipe", "r.yaml", "--sweep", "bits=2,4"], ["--recipe with --sweep", "one per point"]),
        (  # a shape no point's turn has come for yet: refused up front (the model's layers are 32 wide)
            ["--method", "rtn,vptq", "--group-size", "16", "--sweep", "bits=2,3"],
            ["--method vptq at 3:", "no vector length fits 3 index bits"],
        ),
        (["--method", "rtn", "--sweep", "group_size=16,64"], ["--method rtn at 64:", "does not divide"]),
    ],
)
def test_bad_sweeps_are_refused_before_anything_is_written(tmp_path, capsys, llama_dir, argv, fragments):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama_dir, "-o", out, *argv)
    message = " ".join(err.split())  # rich wraps long lines
    assert code == 1 and "Traceback" not in err and stdout == ""
    for fragment in fragments:
        assert fragment in message, message
    assert list(tmp_path.iterdir()) == []


def test_evaluation_text_that_was_calibrated_on_is_refused(tmp_path, capsys, llama_dir, eval_file):
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "compress", llama_dir, "-o", out, "--method", "rtn,gptq", "--sweep", "bits=2,4",
        "--calib", eval_file, "--eval-data", eval_file,
    )  # fmt: skip
    message = " ".join(err.split())
    assert code == 1 and f"{len(PASSAGES)} of the {len(PASSAGES)} evaluation passages" in message
    assert not out.exists()
