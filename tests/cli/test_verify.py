"""``weightkit verify DIR [--inputs] [--json]``: names every file that changed, went missing or appeared
since the output was written, and exits 1 then; a directory without a readable manifest is refused."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from weightkit.checkpoint.manifest import MANIFEST_NAME
from weightkit.cli import main
from weightkit.compress import RTNConfig, compress_checkpoint
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model_and_output(tmp_path) -> tuple[Path, Path]:
    """A tiny Llama and its RTN output (written with a manifest), both in this test's directory."""
    model = save_tiny(tiny_llama(seed=0), tmp_path / "model", tiny_tokenizer(128))
    return model, compress_checkpoint(
        model, tmp_path / "rtn", RTNConfig(bits=4, group_size=16), progress=False
    )


def _verify(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["verify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_untouched_output_verifies(model_and_output, capsys):
    _, out = model_and_output
    code, stdout, _ = _verify(capsys, str(out), "--inputs")
    assert code == 0 and "ok" in stdout and "match" in stdout
    code, stdout, _ = _verify(capsys, str(out), "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["ok"] and summary["findings"] == []
    assert summary["files_checked"] == len([p for p in out.iterdir() if p.name != MANIFEST_NAME])


def test_one_flipped_byte_in_the_shard_fails_and_names_the_file_with_both_checksums(model_and_output, capsys):
    _, out = model_and_output
    shard = out / "model.safetensors"
    expected = hashlib.sha256(shard.read_bytes()).hexdigest()
    _flip_byte(shard, shard.stat().st_size // 2)  # same size: only the hash can tell
    actual = hashlib.sha256(shard.read_bytes()).hexdigest()
    code, stdout, stderr = _verify(capsys, str(out))
    assert code == 1
    assert "model.safetensors" in stdout and expected[:12] in stdout and actual[:12] in stdout
    assert "model.safetensors changed" in stderr
    code, stdout, _ = _verify(capsys, str(out), "--json")
    summary = json.loads(stdout)
    assert code == 1 and not summary["ok"]
    assert summary["findings"] == [
        {"kind": "output", "path": "model.safetensors", "status": "changed", "expected": expected,
         "actual": actual, "failure": True}
    ]  # fmt: skip


def test_a_deleted_and_an_added_file_are_named(model_and_output, capsys):
    _, out = model_and_output
    (out / "tokenizer.json").unlink()
    (out / "sub").mkdir()
    (out / "sub" / "extra.bin").write_bytes(b"x")
    code, stdout, stderr = _verify(capsys, str(out), "--json")
    statuses = {f["path"]: f["status"] for f in json.loads(stdout)["findings"]}
    assert code == 1 and statuses == {"tokenizer.json": "missing", "sub/extra.bin": "added"}
    assert "tokenizer.json missing" in stderr and "sub/extra.bin added" in stderr


def test_inputs_a_changed_config_is_named_only_with_inputs_and_a_removed_input_is_not_found(
    model_and_output, capsys
):
    model, out = model_and_output
    config = model / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    assert _verify(capsys, str(out))[0] == 0  # the output itself is intact
    code, stdout, stderr = _verify(capsys, str(out), "--inputs", "--json")
    findings = json.loads(stdout)["findings"]
    assert code == 1 and [(f["kind"], f["path"], f["status"]) for f in findings] == [
        ("input", config.as_posix(), "changed")
    ]
    assert f"{config.as_posix()} changed" in stderr
    shutil.rmtree(model)  # inputs are often deleted after a run: reported, not a failure
    code, stdout, _ = _verify(capsys, str(out), "--inputs", "--json")
    findings = json.loads(stdout)["findings"]
    assert code == 0 and [(f["path"], f["status"], f["failure"]) for f in findings] == [
        (model.as_posix(), "not found", False)
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "has no weightkit_manifest.json"),
        (b"{not json", "is corrupt: not valid UTF-8 JSON"),
        (b"\xff\xfe", "is corrupt: not valid UTF-8 JSON"),
        (b"[]", "is corrupt: expected a JSON object"),
        (b'{"manifest_version": 7}', "manifest_version 7 is not one this weightkit reads"),
        (b'{"manifest_version": 1, "files": {"a": {"sha256": 1}}, "inputs": []}', "'files' must map"),
        # A stranger's manifest must not make verify read (or hash) files outside the directory.
        (b'{"manifest_version": 1, "files": {"../model/config.json": {"sha256": "", "size": 1}}}', "inside"),
        (b'{"manifest_version": 1, "files": {"/etc/hostname": {"sha256": "", "size": 1}}}', "inside"),
        (b'{"manifest_version": 1, "files": {}, "inputs": [{"files": {}}]}', "'inputs' must list"),
    ],
)
def test_a_missing_or_corrupt_manifest_is_refused_with_a_message(model_and_output, capsys, content, message):
    _, out = model_and_output
    manifest = out / MANIFEST_NAME
    if content is None:
        manifest.unlink()
    else:
        manifest.write_bytes(content)
    code, stdout, stderr = _verify(capsys, str(out))
    assert code == 1 and message in stderr and "Traceback" not in stderr and stdout == ""


def test_the_help_names_the_manifest_file_the_writer_writes():
    from weightkit.checkpoint.manifest import MANIFEST_NAME
    from weightkit.cli import verify

    assert verify._MANIFEST == MANIFEST_NAME  # kept apart so that importing the CLI does not import torch
