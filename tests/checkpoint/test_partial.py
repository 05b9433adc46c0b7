"""Resumable runs (``weightkit.checkpoint.partial``) and the clean-up of killed writers' temporaries
(``weightkit.checkpoint.writer.remove_stale_temporaries``, ``weightkit.checkpoint.owner``)."""

import errno
import hashlib
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from weightkit.checkpoint import CheckpointWriter
from weightkit.checkpoint.owner import current_owner, owner_alive, process_owner
from weightkit.checkpoint.partial import PartialRun
from weightkit.checkpoint.writer import remove_stale_temporaries
from weightkit.errors import WeightkitError

OWNER = ".weightkit-owner"


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(16, 16, generator=generator) for i in range(6)}  # 1 KiB each


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _partial(out: Path, *, resume: bool = False, settings=None, inputs=()) -> PartialRun:
    return PartialRun(
        out,
        settings=settings or {"method": {"density": 0.5}},
        inputs=list(inputs),
        resume=resume,
        unit="shard",
    )


# -- owners ----------------------------------------------------------------------------------------------


def test_a_process_is_alive_by_its_id_and_start_time_not_its_id_alone():
    me = current_owner()
    assert owner_alive(me)
    assert not owner_alive({**me, "start": me["start"] + 1})  # the same id, recycled by another process
    assert not owner_alive({**me, "boot": "another-boot"})
    assert not owner_alive({"pid": "nope"})


def _temporary(parent: Path, name: str, owner: dict | None) -> Path:
    directory = parent / name
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    if owner is not None:
        (directory / OWNER).write_text(json.dumps(owner))
    return directory


def test_a_killed_writers_temporary_is_removed_by_the_next_writer_and_a_live_ones_is_not(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        owner = process_owner(sleeper.pid)
        live = _temporary(tmp_path, ".out.tmp-abcd1234", owner)
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add("w", torch.ones(2))
        assert live.is_dir()  # its owner still runs
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        with pytest.warns(UserWarning, match=r"removing .*\.out\.tmp-abcd1234: left by an unfinished write"):
            CheckpointWriter(tmp_path / "out", overwrite=True).close()
        assert not live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_only_the_writers_own_dead_temporaries_are_removed(tmp_path):
    dead = {**current_owner(), "start": current_owner()["start"] + 1}
    kept = [
        _temporary(tmp_path, ".out.tmp-unowned1", None),  # no record: just made, or an older weightkit's
        _temporary(tmp_path, ".outer.tmp-abcd1234", dead),  # another target's
        _temporary(tmp_path, ".out.tmp-toolongname", dead),  # not mkdtemp's name
        _temporary(tmp_path, "out.tmp-abcd1234", dead),  # not hidden
    ]
    stale = _temporary(tmp_path, ".out.tmp-abcd1234", dead)
    # Killed between making the directory and writing (all of) its owner record: nothing else inside.
    empty = tmp_path / ".out.tmp-empty123"
    empty.mkdir()
    cut_short = tmp_path / ".out.tmp-short123"
    cut_short.mkdir()
    (cut_short / OWNER).write_text('{"pid": 12')
    with pytest.warns(UserWarning, match="left by an unfinished write|left empty by a write"):
        assert remove_stale_temporaries(tmp_path / "out") == [stale, empty, cut_short]
    assert all(path.is_dir() for path in kept)


def test_a_previous_output_moved_aside_by_a_killed_publish_is_put_back(tmp_path):
    """Killed between the publish's two renames: the old output is in .old, the new one not in place."""
    old = _temporary(tmp_path, ".out.tmp-abcd1234.old", None)
    _temporary(tmp_path, ".out.tmp-abcd1234", None)  # its record is removed just before publishing
    with pytest.warns(UserWarning, match="moving .* back to"):
        remove_stale_temporaries(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and not old.exists()


def test_a_previous_output_left_after_a_finished_publish_is_removed(tmp_path):
    _temporary(tmp_path, "out", None)
    old = _temporary(tmp_path, ".out.tmp-abcd1234.old", None)
    with pytest.warns(UserWarning, match="the output it was replaced by is in place"):
        remove_stale_temporaries(tmp_path / "out")
    assert not old.exists() and (tmp_path / "out").is_dir()


# -- the partial directory -------------------------------------------------------------------------------


def test_a_resumed_writer_skips_the_recorded_shards_and_writes_the_same_files(tmp_path):
    tensors = _tensors()
    with CheckpointWriter(tmp_path / "a" / "out", max_shard_bytes=2048) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    expected = _hashes(tmp_path / "a" / "out")
    assert len([n for n in expected if n.endswith(".safetensors")]) == 3

    out = tmp_path / "b" / "out"
    expected_message = (
        r"after shard 1, kept in .*out\.partial; run the same command with --resume to continue from"
    )
    with (
        pytest.raises(KeyboardInterrupt, match=expected_message),
        _partial(out) as partial,
        CheckpointWriter(out, max_shard_bytes=2048, partial=partial) as writer,
    ):
        for i, (name, tensor) in enumerate(tensors.items()):
            if i == 3:
                raise KeyboardInterrupt
            writer.add(name, tensor)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.partial"]
    assert not (out.parent / "out.partial" / "config.json").exists()

    with (
        _partial(out, resume=True) as partial,
        CheckpointWriter(out, max_shard_bytes=2048, partial=partial) as writer,
    ):
        assert writer.resumed == {"layer0.weight", "layer1.weight"}
        for name, tensor in tensors.items():
            if name not in writer.resumed:
                writer.add(name, tensor)
    assert _hashes(out) == expected
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_an_unfinished_run_is_refused_without_resume_and_resume_needs_one(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(WeightkitError, match="nothing to resume: .*out.partial does not exist"):
        _partial(out, resume=True)
    _partial(out)
    with pytest.raises(WeightkitError, match="holds an unfinished run .* run the same command with --resume"):
        _partial(out)


def test_resuming_with_other_settings_or_inputs_names_what_differs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 10)
    out = tmp_path / "out"
    _partial(out, inputs=[model])
    with pytest.raises(WeightkitError, match=r"started with method.density = 0.5, this run has 0.7"):
        _partial(out, resume=True, settings={"method": {"density": 0.7}}, inputs=[model])
    (model / "model.safetensors").write_bytes(b"y" * 11)
    with pytest.raises(WeightkitError, match=r"input file .*model.safetensors has changed"):
        _partial(out, resume=True, inputs=[model])


def test_the_fingerprint_covers_the_files_the_manifest_lists(tmp_path):
    """A resumable run fingerprints an input directory's files as its manifest lists them: a nested file
    counts, a broken symbolic link does not (it used to stop the run with FileNotFoundError), and neither
    does a hidden file or the output being written inside the input, with its partial state."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"x" * 10)
    (model / "sub" / "extra.json").write_text("{}")
    (model / "dangling").symlink_to(model / "nowhere")
    out = model / "out"
    _partial(out, inputs=[model])
    (model / ".cache").write_text("changed")
    out.mkdir()
    (out / "config.json").write_text("{}")
    _partial(out, resume=True, inputs=[model])  # nothing that counts changed
    (model / "sub" / "extra.json").write_text('{"a": 1}')
    with pytest.raises(WeightkitError, match=r"input file .*sub/extra.json has changed"):
        _partial(out, resume=True, inputs=[model])


def test_a_writer_with_another_shard_size_cannot_resume(tmp_path):
    out = tmp_path / "out"
    with _partial(out) as partial:
        CheckpointWriter(out, max_shard_bytes=2048, partial=partial).abort()
    with pytest.raises(WeightkitError, match="started with shards.max_shard_bytes = 2048, this run has 4096"):
        CheckpointWriter(out, max_shard_bytes=4096, partial=_partial(out, resume=True))


def test_a_recorded_shard_that_changed_size_is_refused(tmp_path):
    out = tmp_path / "out"
    with _partial(out) as partial:
        writer = CheckpointWriter(out, max_shard_bytes=1024, partial=partial)
        for name, tensor in _tensors().items():
            writer.add(name, tensor)
        writer.abort()
    shard = next((tmp_path / "out.partial").glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(WeightkitError, match=f"{shard.name} is missing or not the size recorded"):
        _partial(out, resume=True)


def _fail(out: Path, finished: int, error: BaseException) -> None:
    """Run a resumable write of ``out`` that fails with ``error`` after ``finished`` shards."""
    with (
        pytest.raises(type(error)),
        _partial(out) as partial,
        CheckpointWriter(out, max_shard_bytes=1024, partial=partial) as writer,
    ):
        for name, tensor in list(_tensors().items())[: finished + 1]:
            writer.add(name, tensor)
        raise error


def test_a_failure_of_the_machine_after_a_unit_keeps_the_state_and_a_bad_input_does_not(tmp_path):
    disk_full = WeightkitError("writing failed: no space left")
    disk_full.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    bad_input = WeightkitError("tensor x holds NaN")
    for name, finished, error, kept in [
        ("full0", 0, disk_full, False),  # nothing to resume
        ("full1", 1, disk_full, True),
        ("nan1", 1, bad_input, False),  # resuming would stop at the same tensor
    ]:
        _fail(tmp_path / name, finished, error)
        assert (tmp_path / f"{name}.partial").is_dir() == kept
        assert not (tmp_path / name).exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left


def test_a_live_run_keeps_its_partial_directory(tmp_path):
    out = tmp_path / "out"
    _partial(out)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        owner = process_owner(sleeper.pid)
        (tmp_path / "out.partial" / "owner.json").write_text(json.dumps(owner))
        with pytest.raises(
            WeightkitError, match=f"in use by another weightkit run \\(process {sleeper.pid}\\)"
        ):
            _partial(out, resume=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    _partial(out, resume=True)  # its owner is gone


def test_a_state_file_naming_files_outside_its_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    _partial(out)
    state_path = tmp_path / "out.partial" / "state.json"
    state = json.loads(state_path.read_text())
    state["units"] = [{"file": "../victim", "size": 1}]
    state_path.write_text(json.dumps(state))
    with pytest.raises(WeightkitError, match="state.json is missing or unreadable"):
        _partial(out, resume=True)
