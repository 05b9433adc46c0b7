"""Issue 18, item 1: files from strangers never run code and are refused with one clear message.

A pickle checkpoint whose unpickling would run a command (a ``__reduce__`` payload) is offered to every verb
that reads checkpoints, with and without ``--allow-pickle``: the command never runs, the verb exits 1 with
one message and writes nothing. A ``config.json`` whose ``auto_map`` points at a Python file in the model
directory is never imported. Corrupt safetensors headers are covered in tests/checkpoint/test_reader.py
and below (duplicate names).
"""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml

from weightkit.checkpoint.header import read_safetensors_header
from weightkit.cli import main
from weightkit.errors import WeightkitError
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer


class _Payload:
    """Unpickling this runs ``touch MARKER``: the proof that a loader executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama directory whose only weights are a ``pytorch_model.bin`` carrying the payload, and the
    marker file the payload would create."""
    root = tmp_path_factory.mktemp("hostile")
    model = save_tiny(tiny_llama(), root / "model", tiny_tokenizer())
    (model / "model.safetensors").unlink()
    marker = root / "PAYLOAD_RAN"
    state = dict(tiny_llama().state_dict())
    state["model.payload"] = _Payload(marker)
    torch.save(state, model / "pytorch_model.bin")
    return model, marker


def _argv(verb: str, model: Path, out: Path) -> list[str]:
    if verb == "merge":
        recipe = out.parent / f"{out.name}.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {"merge_method": "linear", "models": [{"model": str(model)}, {"model": str(model)}]}
            )
        )
        return ["merge", str(recipe), "-o", str(out)]
    if verb == "compress":
        return ["compress", str(model), "-o", str(out), "--method", "rtn"]
    if verb == "inspect":
        return ["inspect", str(model), "-o", str(out)]
    if verb == "eval":
        return ["eval", str(model)]
    if verb == "adapt":
        return ["adapt", str(model), "-o", str(out), "--max-steps", "1"]
    return ["train", str(model), "-o", str(out), "--max-steps", "1"]


VERBS = ("compress", "merge", "inspect", "eval", "adapt", "train")


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "allow-pickle"])
@pytest.mark.parametrize("verb", VERBS)
def test_a_pickle_payload_never_runs(hostile, tmp_path, capsys, verb, allow_pickle):
    model, marker = hostile
    out = tmp_path / "out"
    argv = _argv(verb, model, out) + (["--allow-pickle"] if allow_pickle else [])
    code = main(argv)
    _, err = capsys.readouterr()
    assert not marker.exists(), f"weightkit {verb} executed the pickle payload"
    assert code == 1 and "Traceback" not in err
    # Refused by default as a pickle; with --allow-pickle, torch.load(weights_only=True) refuses the payload.
    assert ("pickle checkpoint" if not allow_pickle else "weights_only=True") in err
    assert not out.exists()


def test_auto_map_code_in_the_model_directory_is_never_imported(tmp_path, capsys):
    """transformers would import ``modeling_evil.py`` only with ``trust_remote_code=True``, which weightkit
    never passes: the model loads as the architecture its config names, and the module never runs."""
    model = save_tiny(tiny_llama(), tmp_path / "model", tiny_tokenizer())
    marker = tmp_path / "IMPORTED"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    for argv in (
        ["eval", str(model)],
        ["compress", str(model), "-o", str(tmp_path / "q"), "--method", "rtn"],
        ["inspect", str(model), "-o", str(tmp_path / "report")],
    ):
        main(argv)
        capsys.readouterr()
        assert not marker.exists(), f"weightkit {argv[0]} imported the model directory's code"


def _safetensors_with_header(path: Path, header_json: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)
    return path


def test_a_header_with_a_duplicate_tensor_name_is_refused_by_name(tmp_path):
    """JSON keeps the last of two equal keys; a header naming one tensor twice must not be read as one."""
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [%d, %d]}'
    header = ('{"w": ' + entry % (0, 4) + ', "w": ' + entry % (4, 8) + "}").encode()
    path = _safetensors_with_header(tmp_path / "dup.safetensors", header, bytes(8))
    with pytest.raises(WeightkitError, match="tensor w twice"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        # a shape whose size would be exabytes: refused from the header, nothing allocated
        (b'{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}', 4, "needs"),
        (b'{"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}', 4, "unsupported dtype"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 2, "truncated"),
        (
            b'{"__metadata__": {"a": "\xff"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            4,
            "JSON",
        ),
        (
            b'{"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            4,
            "metadata",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            b'"v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            8,
            "needs|overlaps",
        ),
    ],
    ids=["absurd-shape", "unknown-dtype", "truncated", "non-utf8-metadata", "non-string-metadata", "overlap"],
)
def test_corrupt_headers_are_refused_with_a_message(tmp_path, header, data, fragment):
    path = _safetensors_with_header(tmp_path / "bad.safetensors", header, bytes(data))
    with pytest.raises(WeightkitError, match=fragment):
        read_safetensors_header(path)
