"""Issue 18, item 3 for ``weightkit adapt`` and ``weightkit train``: runs killed at random points inside the
training, by SIGKILL and by SIGINT (Ctrl-C), never leave a complete-looking partial output, never leave a
half-written checkpoint where ``--resume`` would look, and ``--resume`` ends bit-identical to a run that was
never interrupted.

Each verb gets one chain of runs in subprocesses: the first run and every ``--resume`` after it are killed,
alternately by SIGINT and SIGKILL, until each signal was sent ``WEIGHTKIT_KILL_RUNS`` times (default 1); a
last ``--resume`` then runs to the end. A kill lands once a run has written a random number (1 or 2) of new
checkpoints (so it never lands in the torch import), after a random delay of up to 30 ms (so it lands in a
step, in a checkpoint being written, or after the last step). The randomness is seeded: a failure replays.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightkit.cli import main
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

KILLS_PER_SIGNAL = int(os.environ.get("WEIGHTKIT_KILL_RUNS", "1"))
SIGNALS = [signal.SIGINT, signal.SIGKILL] * KILLS_PER_SIGNAL
# Every kill advances a run by at least one checkpoint: enough steps for all of them, and a few to finish.
STEPS = 2 * len(SIGNALS) + 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    model = save_tiny(tiny_llama(seed=0), root / "model", tiny_tokenizer(128))
    data = root / "train.txt"
    data.write_text("\n\n".join(f"the cat sat on the mat number {i} and the dog ran off" for i in range(24)))
    return model, data


def _argv(verb: str, model: Path, data: Path, out: Path) -> list[str]:
    common = ["--data", str(data), "--max-steps", str(STEPS), "--batch-size", "4", "--save-every", "1"]
    if verb == "adapt":
        return [
            "adapt",
            str(model),
            "-o",
            str(out),
            "--method",
            "lora",
            "--rank",
            "4",
            "--lr",
            "1e-2",
            *common,
        ]
    return [
        "train", str(model), "-o", str(out), "--optimizer", "galore", "--rank", "4", "--update-proj-gap", "2",
        "--lr", "1e-2", *common,
    ]  # fmt: skip


def _main_on_one_thread(argv: list[str]) -> int:
    """``weightkit ARGV`` in this process, on one thread as the subprocesses run: training gives the same bits
    again at one thread count, not across thread counts (the order of a matmul's sums depends on them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _checkpoint_names(checkpoints: Path) -> set[str]:
    return {p.name for p in checkpoints.glob("checkpoint-*")} if checkpoints.is_dir() else set()


def _run_and_kill(argv: list[str], checkpoints: Path, sig: signal.Signals, rng: random.Random) -> int:
    """Start ``weightkit ARGV``, wait until it has written 1 or 2 new checkpoints, wait up to 30 ms more,
    send ``sig`` and return the exit code (the run may have finished first)."""
    before = _checkpoint_names(checkpoints)
    wanted = rng.randint(1, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightkit.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while len(_checkpoint_names(checkpoints) - before) < wanted and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared within 300 s"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 130, -signal.SIGKILL), err[-3000:]
    if proc.returncode == 130:  # Ctrl-C: one message saying where the state went, no traceback
        assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    return proc.returncode


def _assert_only_complete_checkpoints(checkpoints: Path) -> None:
    """Everything ``--resume`` may pick (any non-hidden entry) is a whole checkpoint: its JSON files parse,
    its safetensors files load, and it has the trainer state. A checkpoint being written when the kill
    came may only exist as a hidden temporary directory."""
    for entry in checkpoints.iterdir():
        if entry.name.startswith("."):
            assert ".tmp-" in entry.name, entry
            continue
        assert entry.name == "interrupted" or entry.name.startswith("checkpoint-"), entry
        files = {p.name for p in entry.iterdir()}
        assert {"trainer_state.json", "trainer_state.safetensors"} <= files, (entry, files)
        for path in entry.iterdir():
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                load_file(path)


@pytest.mark.parametrize("verb", ["adapt", "train"])
def test_runs_killed_at_random_points_resume_to_the_uninterrupted_output(inputs, tmp_path, capsys, verb):
    model, data = inputs
    whole = tmp_path / "whole" / "out"  # the output's name is in its model card
    assert _main_on_one_thread([*_argv(verb, model, data, whole), "--json"]) == 0
    capsys.readouterr()
    expected = _hashes(whole)

    out = tmp_path / "out"
    checkpoints = tmp_path / "out-checkpoints"
    rng = random.Random(f"{verb}-kills")
    argv = _argv(verb, model, data, out)
    killed = {signal.SIGINT: 0, signal.SIGKILL: 0}
    for sig in SIGNALS:
        code = _run_and_kill([*argv, *(["--resume"] if checkpoints.exists() else [])], checkpoints, sig, rng)
        if code == 0:  # the kill came after the run had finished
            break
        killed[sig] += 1
        assert not out.exists(), f"a run killed by {sig.name} left {out}"
        strays = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert all(name.startswith(".out.tmp-") for name in strays), strays
        _assert_only_complete_checkpoints(checkpoints)
        if sig == signal.SIGINT:  # Ctrl-C saved the state at the end of the step it came in
            step = json.loads((checkpoints / "interrupted" / "trainer_state.json").read_text())["step"]
            assert 1 <= step < STEPS
    else:
        assert _main_on_one_thread([*argv, "--resume", "--json"]) == 0
        capsys.readouterr()
    assert killed[signal.SIGINT] >= 1 and killed[signal.SIGKILL] >= 1, killed
    assert _hashes(out) == expected
