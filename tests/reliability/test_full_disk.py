"""Issue 18, item 4 (disk): a write that fails half way (a full disk) leaves the previous output as it was.

The disk fills in a subprocess whose file-size limit (``RLIMIT_FSIZE``) is below the size of the output's
largest file, with SIGXFSZ ignored so that the write fails with EFBIG ("File too large") as it would with
ENOSPC on a full disk. Each command first writes its output normally; the same command with ``--force``
then runs under the limit: it exits 1 with one message naming the output and the error, the earlier output
is intact bit for bit, and no temporary directory is left beside it.
"""

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from weightkit.cli import main
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("full-disk")
    models = [save_tiny(tiny_llama(seed=seed), root / f"model{seed}", tiny_tokenizer(128)) for seed in (0, 1)]
    data = root / "train.txt"
    data.write_text("\n\n".join(f"the cat sat on the mat number {i} and the dog ran off" for i in range(12)))
    return models[0], models[1], data


def _argv(verb: str, inputs: tuple[Path, Path, Path], out: Path) -> list[str]:
    model, other, data = inputs
    if verb == "merge":
        recipe = out.with_suffix(".yaml")
        recipe.write_text(
            yaml.safe_dump(
                {"merge_method": "linear", "models": [{"model": str(model)}, {"model": str(other)}]}
            )
        )
        return ["merge", str(recipe), "-o", str(out)]
    if verb == "compress":
        return ["compress", str(model), "-o", str(out), "--method", "rtn", "--group-size", "32"]
    return ["adapt", str(model), "-o", str(out), "--rank", "4", "--data", str(data), "--max-steps", "1"]


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("verb", "limit"),
    [("merge", None), ("compress", None), ("adapt", None), ("compress", 2000)],
    ids=["merge", "compress", "adapt", "compress-tokenizer"],
)
def test_a_full_disk_leaves_the_previous_output_intact(inputs, tmp_path, capsys, verb, limit):
    """``limit``: the file-size limit, by default half the largest weight file (the disk fills while the
    tensors are written); 2000 bytes fills it while the tokenizer (8.5 kB) is copied."""
    out = tmp_path / "out"
    argv = _argv(verb, inputs, out)
    assert main([*argv, "--json"]) == 0
    capsys.readouterr()
    before = _hashes(out)
    if limit is None:
        limit = max(p.stat().st_size for p in out.rglob("*.safetensors")) // 2

    def fill_the_disk_at_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run(
        [sys.executable, "-m", "weightkit.cli", *argv, "--force", "--json"],
        preexec_fn=fill_the_disk_at_limit,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    message = " ".join(run.stderr.split())  # rich wraps long lines
    assert f"writing {out} failed" in message and "File too large" in message, run.stderr[-3000:]
    assert _hashes(out) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
