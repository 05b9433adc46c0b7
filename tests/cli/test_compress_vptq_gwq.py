"""``weightkit compress --method vptq|gwq`` as a user runs it: bad input refused with one message and nothing
written; the saved models read back with the in-memory logits."""

import pytest
import torch

from weightkit.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "gwq", "--outlier-fraction", "1"], "--outlier-fraction must be in [0, 1), got 1.0"),
        (["--method", "gwq", "--outlier-fraction", "-0.1"], "--outlier-fraction must be in [0, 1), got -0.1"),
        (
            ["--method", "vptq", "--bits", "2.3"],
            "--bits 2.3: no vector length gives each codebook a whole number",
        ),
        (
            ["--method", "vptq", "--bits", "1.5", "--vector-length", "3"],
            "vptq: --bits 1.5 x vector length 3 = 4.5 index bits per vector; it must be a whole number",
        ),
        (
            ["--method", "vptq", "--vector-length", "8"],
            f"{Q_PROJ}: a codebook of 65536 codewords is larger than the 128 vectors of length 8",
        ),
        (["--method", "vptq", "--vector-length", "3"], f"{Q_PROJ}: vector length 3 does not divide its 32"),
        (  # "bits" in the prose stays a word; only the field's own mentions become the flag
            ["--method", "vptq", "--bits", "2", "--vector-length", "64"],
            "vptq: 128 index bits per vector for the codebook",
        ),
        (["--method", "vptq", "--bits", "5"], f"{Q_PROJ}: no vector length fits 5 index bits per weight"),
        (["--method", "gptq", "--bits", "2.5"], "gptq: --bits=2.5: expected an integer"),
        (
            ["--method", "gptq", "--vector-length", "4"],
            "--vector-length applies to --method vptq only, not gptq",
        ),
        (
            ["--method", "vptq", "--outlier-fraction", "0.01"],
            "--outlier-fraction applies to --method gwq only",
        ),
        (["--method", "vptq", "--group-size", "32"], "--group-size applies to --method"),
        (
            ["--method", "rtn", "--kmeans-iterations", "3"],
            "--kmeans-iterations applies to --method vptq only",
        ),
    ],
)
def test_bad_vptq_and_gwq_input_gets_one_message_and_writes_nothing(
    tmp_path, capsys, llama_dir, argv, message
):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama_dir, "-o", out, *argv)
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert message in " ".join(err.split())  # rich wraps long lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_gwq_refuses_an_encoder_before_loading_it(tmp_path, capsys, bert_dir):
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", bert_dir, "-o", out, "--method", "gwq", "--group-size", "32")
    err = " ".join(err.split())
    assert (
        code == 1
        and f"{bert_dir} (model_type 'bert') is an encoder: GWQ ranks weights by the gradient" in err
    )
    assert "use method gptq, awq or vptq" in err and not out.exists()


def _in_memory(model_dir, config, text_file):
    from weightkit.compress import compress
    from weightkit.models import load_model

    model, tokenizer, _ = load_model(model_dir)
    return compress(model, config, data=str(text_file), tokenizer=tokenizer, progress=False)


@pytest.mark.parametrize(
    ("flags", "config"),
    [
        (
            ["--method", "vptq", "--bits", "2", "--kmeans-iterations", "5"],
            {"method": "vptq", "kmeans_iterations": 5},
        ),
        (
            ["--method", "gwq", "--bits", "3", "--group-size", "32", "--outlier-fraction", "0.02"],
            {"method": "gwq", "bits": 3, "group_size": 32, "outlier_fraction": 0.02},
        ),
    ],
    ids=["vptq", "gwq"],
)
def test_the_saved_model_reads_back_as_the_in_memory_result(
    tmp_path, capsys, llama_dir, text_file, flags, config
):
    from weightkit import load
    from weightkit.registry import config_from_dict

    out, calibration = tmp_path / "out", ["--calib", text_file, "--calib-samples", "8", "--seq-len", "64"]
    code, _, err = run(capsys, "compress", llama_dir, "-o", out, *flags, *calibration, "--json")
    assert code == 0, err
    config = config_from_dict("compress", {**config, "calib_samples": 8, "calib_max_length": 64})
    expected = _in_memory(llama_dir, config, text_file)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
    with torch.no_grad():
        torch.testing.assert_close(load(out)(ids).logits, expected(ids).logits, atol=1e-5, rtol=1e-5)
