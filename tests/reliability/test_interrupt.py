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
# Shard sizes that give the outputs of the tiny models below ~10-20 shards.
MERGE_SHARD, COMPRESS_SHARD = "40KB", "12KB"


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
        return ["merge", str(inputs["recipe"]), "--random-seed", "7", "--max-shard-size", MERGE_SHARD]
    compress = ["compress", str(inputs["base"]), "--max-shard-size", COMPRESS_SHARD, "--group-size", "16"]
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


def _kill_after(argv: list[str], partial: Path, units: int, sig: signal.Signals) -> tuple[int, str]:
    """Run the CLI, send ``sig`` once ``partial`` records ``units`` finished units, and return the exit
    code and what the run printed."""
    log = partial.with_name("log.txt")
    with open(log, "w") as output:  # not a pipe: a full pipe would block the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "weightkit.cli", *argv],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and _units(partial) < units and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(sig)
        code = proc.wait(timeout=60)
    printed = log.read_text()
    log.unlink()
    return code, printed


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
    for name in ("merge", "rtn", "gptq"):
        out = root / name / "out"  # the same directory name as the trials: the model card holds it
        assert main([*_command(name, inputs), "-o", str(out), "--json"]) == 0
        hashes[name] = _hashes(out)
        assert sum(k.endswith(".safetensors") for k in hashes[name]) >= 8  # several shards: kills land inside
    return hashes


@pytest.mark.parametrize("name", ["merge", "rtn", "gptq"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_run_leaves_nothing_finished_and_resumes_bit_identical(
    inputs, references, tmp_path, capsys, name, sig
):
    rng = random.Random(f"{name}-{sig.name}")
    expected = references[name]
    argv = _command(name, inputs)
    # Kill once 0 .. units-1 units are recorded (merge and rtn keep shards, gptq blocks: the model has 4),
    # leaving at least two units of work for the signal to land in.
    units = 4 if name == "gptq" else len([k for k in expected if k.endswith(".safetensors")])
    units -= 2
    finished = 0
    for trial in range(KILL_RUNS):
        run = tmp_path / f"trial{trial}"
        out = run / "out"
        partial = run / "out.partial"
        previous = None
        replacing = (
            trial + (sig == signal.SIGINT)
        ) % 2 == 1  # every other trial replaces an output (--force)
        if replacing:
            shutil.copytree(inputs["base"], out)
            previous = _hashes(out)
        force = ["--force"] if replacing else []
        run.mkdir(exist_ok=True)
        code, printed = _kill_after([*argv, "-o", str(out), *force], partial, rng.randrange(units), sig)
        if code == 0:  # finished before the signal came: nothing to resume
            assert _hashes(out) == expected
            finished += 1
            continue
        if sig == signal.SIGINT:
            assert code == 130, printed
            assert "--resume to continue from" in printed
        else:
            assert code == -signal.SIGKILL, printed
        assert (_hashes(out) == previous) if replacing else not out.exists()
        assert _complete_looking(run, {out} if replacing else set()) == []
        assert not (partial / "config.json").exists()

        assert main([*argv, "-o", str(out), "--resume", *force, "--json"]) == 0, capsys.readouterr()
        capsys.readouterr()
        assert _hashes(out) == expected
        assert [p.name for p in run.iterdir()] == ["out"]  # the partial state and any stale temporary: gone
    assert finished <= KILL_RUNS // 2  # most signals landed inside the work


# -- in-process: what a resumed run refuses, and what a calibrated run keeps --------------------------


def _printed(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def _interrupt_on_call(monkeypatch, module, name: str, call: int) -> None:
    """Make ``module.name`` raise KeyboardInterrupt (Ctrl-C) on its ``call``-th call."""
    original, calls = getattr(module, name), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)


def test_resuming_with_other_options_is_refused_by_name_and_without_resume_the_state_is_kept(
    inputs, references, tmp_path, capsys, monkeypatch
):
    import weightkit.compress.stream as stream

    out = tmp_path / "out"
    argv = [*_command("rtn", inputs), "-o", str(out), "--json"]
    _interrupt_on_call(monkeypatch, stream, "stored_tensors", 6)
    assert main(argv) == 130
    assert "run the same command with --resume to continue from shard" in _printed(capsys)
    monkeypatch.undo()
    bits = argv.index("--group-size")
    assert main([*argv[:bits], "--group-size", "32", *argv[bits + 2 :], "--resume"]) == 1
    assert "started with config.group_size = 16, this run has 32" in _printed(capsys)
    assert main(argv) == 1
    assert "holds an unfinished run" in _printed(capsys)
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    assert _hashes(out) == references["rtn"]


def test_a_calibrated_run_keeps_each_finished_block_and_only_the_last_ones_outputs(
    inputs, references, tmp_path, capsys, monkeypatch
):
    import weightkit.compress.quant.calibrated as calibrated

    out = tmp_path / "out"
    argv = [*_command("gptq", inputs), "-o", str(out), "--json"]
    _interrupt_on_call(monkeypatch, calibrated, "_gptq_group", 3 * 4 + 1)  # 4 input groups per block
    assert main(argv) == 130
    assert "after block 3, kept in" in _printed(capsys)
    monkeypatch.undo()
    kept = sorted(p.name for p in (tmp_path / "out.partial").iterdir() if p.suffix == ".safetensors")
    assert kept == [*(f"block-{i:05d}.safetensors" for i in (1, 2, 3)), "outputs-00003.safetensors"]
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    assert _hashes(out) == references["gptq"]


def test_a_method_that_cannot_resume_is_refused_by_name(inputs, tmp_path, capsys):
    argv = [
        "compress",
        str(inputs["base"]),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "-o",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--resume"]) == 1
    assert "magnitude cannot resume" in _printed(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["awq", "sparsegpt", "wanda"])
def test_the_other_block_resumable_methods_resume_bit_identical(inputs, tmp_path, monkeypatch, method):
    """AWQ (rescaled norms), SparseGPT and Wanda (pruned dense weights, sparsity.json) after a Ctrl-C
    that comes as the third block is being kept."""
    import weightkit.compress.stream as stream
    from weightkit.compress import compress_checkpoint
    from weightkit.compress.prune.sparsegpt import SparseGPTConfig
    from weightkit.compress.prune.wanda import WandaConfig
    from weightkit.compress.quant.calibrated import AWQConfig

    calibration = {"calib_samples": 8, "calib_max_length": 32}
    config = {
        "awq": AWQConfig(bits=4, group_size=16, n_grid=4, clip=False, **calibration),
        "sparsegpt": SparseGPTConfig(sparsity=0.5, **calibration),
        "wanda": WandaConfig(sparsity="2:4", **calibration),
    }[method]
    run = [inputs["base"], None, config, inputs["calib"]]
    compress_checkpoint(*[tmp_path / "a" / "out" if a is None else a for a in run], progress=False)
    out = tmp_path / "b" / "out"
    _interrupt_on_call(monkeypatch, stream._BlockJournal, "record", 3)
    with pytest.raises(KeyboardInterrupt, match="after block 2"):
        compress_checkpoint(*[out if a is None else a for a in run], progress=False)
    monkeypatch.undo()
    compress_checkpoint(*[out if a is None else a for a in run], progress=False, resume=True)
    assert _hashes(out) == _hashes(tmp_path / "a" / "out")
    assert [p.name for p in out.parent.iterdir()] == ["out"]
