"""Issue 18, item 3 (merge and compress): runs killed at random points, and ``--resume``.

Each trial starts the CLI in a subprocess, waits until the run has recorded a seeded-random number of
finished units in ``OUT.partial/`` (so the kill lands inside the work, not in the torch import), and
kills it with SIGKILL or SIGINT. Then: nothing that looks finished exists (OUT absent, or the previous
output intact when the command replaces one with --force), and the same command with ``--resume`` ends
with files bit-identical (sha256 of every file) to those of a run that was never interrupted.

``WEIGHTKIT_KILL_RUNS`` (default 1) sets the trials per command and signal.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from weightkit.cli import main
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

KILL_RUNS = int(os.environ.get("WEIGHTKIT_KILL_RUNS", "1"))
SHARD = "40KB"  # the tiny models below make ~10-20 shards


def _tiny(seed: int | None):
    """A small Llama (4 layers of width 64: big enough for ~15 shards of 40 KB, tiny enough to be quick);
    ``seed``: its weights plus seeded noise (a fine-tune), None: the base."""
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    paths = {"base": save_tiny(_tiny(None), root / "base", tiny_tokenizer())}
    for seed in (1, 2):
        paths[f"tune{seed}"] = save_tiny(_tiny(seed), root / f"tune{seed}", tiny_tokenizer())
    recipe = root / "dare.yaml"
    parameters = {"density": 0.5, "weight": 0.5}
    models = [{"model": str(paths[t]), "parameters": parameters} for t in ("tune1", "tune2")]
    recipe.write_text(
        yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(paths["base"]), "models": models})
    )
    paths["recipe"] = recipe
    calib = root / "calib.txt"
    calib.write_text(
        "\n\n".join(f"passage {i}: the quick brown fox jumps over the lazy dog " * 4 for i in range(16))
    )
    paths["calib"] = calib
    return paths


def _command(name: str, inputs: dict[str, Path]) -> list[str]:
    if name == "merge":
        return ["merge", str(inputs["recipe"]), "--random-seed", "7", "--max-shard-size", SHARD]
    compress = ["compress", str(inputs["base"]), "--max-shard-size", SHARD, "--group-size", "16"]
    if name == "rtn":
        return [*compress, "--method", "rtn"]
    calibrated = ["--calib", str(inputs["calib"]), "--calib-samples", "8", "--seq-len", "32"]
    return [*compress, "--method", "gptq", *calibrated]


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _units(partial: Path) -> int:
    """Finished units recorded in ``partial``'s state (-1 while there is no readable state yet)."""
    try:
        return len(json.loads((partial / "state.json").read_text())["units"])
    except (OSError, ValueError, TypeError, KeyError):
        return -1


def _kill_after(
    argv: list[str], partial: Path, units: int, sig: signal.Signals
) -> subprocess.CompletedProcess:
    """Run the CLI, and send ``sig`` once ``partial`` records ``units`` finished units."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightkit.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and _units(partial) < units and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _complete_looking(root: Path, allowed: set[Path]) -> list[Path]:
    """Directories under ``root`` (other than ``allowed``) that hold a config.json and are not named as
    temporary (``.NAME.tmp-*``): what a user could mistake for a finished model."""
    found = []
    for config in root.rglob("config.json"):
        directory = config.parent
        named_temporary = any(
            part.startswith(".") and ".tmp-" in part for part in directory.relative_to(root).parts
        )
        if directory not in allowed and not named_temporary:
            found.append(directory)
    return found


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Each command's files from a run that was not interrupted (in-process: the same code)."""
    root = tmp_path_factory.mktemp("reference")
    hashes = {}
    for name in ("merge",):
        out = root / name / "out"  # the same directory name as the trials: the model card holds it
        assert main([*_command(name, inputs), "-o", str(out), "--json"]) == 0
        hashes[name] = _hashes(out)
        assert sum(k.endswith(".safetensors") for k in hashes[name]) >= 8  # several shards: kills land inside
    return hashes


@pytest.mark.parametrize("name", ["merge"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_run_leaves_nothing_finished_and_resumes_bit_identical(
    inputs, references, tmp_path, capsys, name, sig
):
    rng = random.Random(f"{name}-{sig.name}")
    expected = references[name]
    argv = _command(name, inputs)
    units = {"merge": len([k for k in expected if k.endswith(".safetensors")]), "rtn": 0, "gptq": 4}[name]
    finished = 0
    for trial in range(KILL_RUNS):
        run = tmp_path / f"trial{trial}"
        out = run / "out"
        partial = run / "out.partial"
        previous = None
        replacing = trial % 2 == 1  # every other trial replaces an earlier output (--force)
        if replacing:
            shutil.copytree(inputs["base"], out)
            previous = _hashes(out)
        force = ["--force"] if replacing else []
        killed = _kill_after([*argv, "-o", str(out), *force], partial, rng.randrange(units or 1), sig)
        if killed.returncode == 0:  # finished before the signal came: nothing to resume
            assert _hashes(out) == expected
            finished += 1
            continue
        if sig == signal.SIGINT:
            assert killed.returncode == 130, killed.stderr + killed.stdout
            assert "--resume to continue from" in killed.stdout + killed.stderr
        else:
            assert killed.returncode == -signal.SIGKILL
        assert (_hashes(out) == previous) if replacing else not out.exists()
        assert _complete_looking(run, {out} if replacing else set()) == []
        assert not (partial / "config.json").exists()

        assert main([*argv, "-o", str(out), "--resume", *force, "--json"]) == 0, capsys.readouterr()
        capsys.readouterr()
        assert _hashes(out) == expected
        assert [p.name for p in run.iterdir()] == ["out"]  # the partial state and any stale temporary: gone
    assert finished <= KILL_RUNS // 2  # most signals landed inside the work
