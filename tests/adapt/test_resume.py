"""``weightkit adapt --resume`` and Ctrl-C: a stopped and resumed run ends as an unstopped one, exactly."""

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import weightkit.runtime.training as training
from weightkit.adapt import BoneConfig, LoRAConfig
from weightkit.adapt.trainer import finetune
from weightkit.cli import main
from weightkit.errors import WeightkitError
from weightkit.runtime.training import TrainConfig

TEXTS = [f"the cat sat on the mat number {i} and the dog ran to the park" for i in range(16)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(TEXTS))
    return path


def _args(llama_dir, data, out, *more):
    # 12 training examples in batches of 4: 8 steps cross two epochs (each reshuffled); LoRA dropout draws
    # from torch's random state, so the resumed run must also continue that.
    return [
        "adapt", str(llama_dir), "-o", str(out), "--data", str(data), "--rank", "4", "--max-steps", "8",
        "--lr", "1e-2", "--batch-size", "4", "--save-every", "2", "--option", "dropout=0.1", "--json", *more,
    ]  # fmt: skip


def _interrupt_at_forward(monkeypatch, n, interrupt):
    """Call ``interrupt()`` during the ``n``-th training forward pass (after the model ran)."""
    calls, real = {"n": 0}, training.forward_batch

    def forward(model, batch):
        out = real(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == n:
                interrupt()
        return out

    monkeypatch.setattr(training, "forward_batch", forward)


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _assert_same_adapter(a, b):
    ours, theirs = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_runs_stopped_by_ctrl_c_or_a_keyboard_interrupt_resume_to_the_uninterrupted_result(
    llama_dir, data, tmp_path, monkeypatch, capsys
):
    assert main(_args(llama_dir, data, tmp_path / "whole")) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:  # a real SIGINT in step 3: the step ends, then the state is saved
        _interrupt_at_forward(patch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
        assert main(_args(llama_dir, data, tmp_path / "ctrl_c")) == 130
    message = capsys.readouterr().err
    checkpoints = tmp_path / "ctrl_c-checkpoints"
    assert f"{checkpoints / 'interrupted'}" in message and "--resume" in message, message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "interrupted"]
    assert not (tmp_path / "ctrl_c").exists()
    # From checkpoint-2 alone too (a run killed after it): a copy without the interrupted state.
    killed = tmp_path / "killed-checkpoints"
    shutil.copytree(checkpoints, killed, ignore=shutil.ignore_patterns("interrupted"))
    assert main(_args(llama_dir, data, tmp_path / "ctrl_c", "--resume")) == 0
    assert main(_args(llama_dir, data, tmp_path / "killed", "--resume")) == 0
    # A KeyboardInterrupt inside step 5's forward (dropout has drawn): saved as it was after step 4.
    with monkeypatch.context() as patch:
        _interrupt_at_forward(patch, 5, _raise_keyboard_interrupt)
        assert main(_args(llama_dir, data, tmp_path / "raised")) == 130
    assert main(_args(llama_dir, data, tmp_path / "raised", "--resume")) == 0
    summaries = capsys.readouterr().out
    for run in ("ctrl_c", "killed", "raised"):
        _assert_same_adapter(tmp_path / run, tmp_path / "whole")
    assert summaries.count('"steps": 8') == 3


def test_resume_is_refused_without_a_checkpoint_or_with_other_settings(llama_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(llama_dir, data, out, "--resume")) == 1
    assert "nothing to resume" in capsys.readouterr().err
    config = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, save_every=2)
    with pytest.raises(KeyboardInterrupt, match="after step 3 of 4"), pytest.MonkeyPatch.context() as patch:
        _interrupt_at_forward(patch, 4, _raise_keyboard_interrupt)
        finetune(llama_dir, LoRAConfig(rank=4), out, config, data=data, progress=False)
    other_data = tmp_path / "other.txt"
    other_data.write_text("\n\n".join(TEXTS[::-1]))
    refused = [
        ("lr = 0.01, this run has 0.02", LoRAConfig(rank=4), {"lr": 2e-2}, data),
        ("batch_size = 4, this run has 2", LoRAConfig(rank=4), {"batch_size": 2}, data),
        ("adapter.rank = 4, this run has 2", LoRAConfig(rank=2), {}, data),
        ("method = 'lora', this run has 'bone'", BoneConfig(rank=4), {}, data),
        ("training examples", LoRAConfig(rank=4), {}, other_data),
    ]
    for message, adapter_config, changes, examples in refused:
        changed = TrainConfig(**{**vars(config), **changes})
        with pytest.raises(WeightkitError, match=f"cannot resume from .*interrupted.*{message}"):
            finetune(llama_dir, adapter_config, out, changed, data=examples, resume=True, progress=False)
    # save_every only says when to save: a resumed run may change it.
    summary = finetune(
        llama_dir, LoRAConfig(rank=4), out, TrainConfig(**{**vars(config), "save_every": 0}), data=data,
        resume=True, progress=False,
    )  # fmt: skip
    assert summary["steps"] == 4
