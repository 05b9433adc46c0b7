"""``weightkit train``: every optimizer trains a model that transformers loads, interrupted runs resume to the
uninterrupted result bit for bit, and bad input is refused before anything is written."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import weightkit.runtime.training as training
from weightkit.cli import main
from weightkit.errors import WeightkitError
from weightkit.runtime.training import TrainConfig, evaluate, make_batches, split_examples
from weightkit.testing import tiny_tokenizer
from weightkit.train.trainer import OPTIMIZERS, train_model

TEXTS = [f"the cat sat on the mat number {i} and the dog ran to the park" for i in range(16)]
SINGLE_PROCESS = [name for name in OPTIMIZERS if name != "zo-dist"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(TEXTS))
    return path


def _args(model_dir, data, out, optimizer, *more):
    # 14 training examples in batches of 4: 6 steps cross two epochs; GaLore refreshes every 2 steps.
    lr = "1e-3" if optimizer.startswith("zo") else "1e-2"
    return [
        "train", str(model_dir), "-o", str(out), "--optimizer", optimizer, "--data", str(data), "--rank", "4",
        "--update-proj-gap", "2", "--max-steps", "6", "--lr", lr, "--batch-size", "4", "--save-every", "2",
        "--json", *more,
    ]  # fmt: skip


def _weights(directory):
    return load_file(directory / "model.safetensors")


def _assert_same_weights(a, b):
    ours, theirs = _weights(a), _weights(b)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("optimizer", SINGLE_PROCESS)
def test_every_optimizer_trains_every_weight_into_a_directory_transformers_loads(
    llama_dir, data, tmp_path, capsys, optimizer
):
    out = tmp_path / "out"
    assert main(_args(llama_dir, data, out, optimizer)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["optimizer"] == optimizer
    trained = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True)
    changed = [
        name
        for (name, a), b in zip(trained.named_parameters(), original.parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    # Full-parameter training: the embeddings, norms and every projection moved.
    assert len(changed) == len(list(original.parameters())), changed
    # What was saved is what was evaluated: the held-out loss of the loaded model is the summary's.
    held_out = split_examples(TEXTS, None, 0.1, 0)[2]
    batches = make_batches(tiny_tokenizer(128), held_out, None, batch_size=4, max_length=256)
    loss = evaluate(trained, batches, classification=False)["eval_loss"]
    assert loss == pytest.approx(summary["eval"]["eval_loss"], rel=1e-5)


def test_galore_keeps_a_fraction_of_adamws_state(llama_dir, data, tmp_path):
    config = TrainConfig(max_steps=1, batch_size=4, lr=1e-3)
    states = {
        name: train_model(
            llama_dir, tmp_path / name, config, optimizer=name, rank=4, data=data, progress=False
        )["optimizer_state_bytes"]
        for name in ("adamw", "galore", "qgalore", "svdfree")
    }
    # Projected block matrices (hidden 32, MLP 64, rank 4): 2 x 4 x max(m, n) moments + the projection;
    # the embedding and norms keep AdamW's two moments. 4-bit codes and DCT indices are smaller still.
    assert states["galore"] < 0.5 * states["adamw"], states
    assert states["qgalore"] < states["galore"] and states["svdfree"] < states["galore"], states


def _interrupt_at_forward(monkeypatch, n):
    """Send SIGINT (Ctrl-C) during the ``n``-th forward pass of training."""
    calls, real = {"n": 0}, training.forward_batch

    def forward(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch)

    monkeypatch.setattr(training, "forward_batch", forward)


@pytest.mark.parametrize("optimizer", ["galore", "qgalore", "svdfree", "galore-layerwise", "adamp", "zo"])
def test_interrupted_runs_resume_to_the_uninterrupted_weights_bit_for_bit(
    llama_dir, data, tmp_path, monkeypatch, capsys, optimizer
):
    assert main(_args(llama_dir, data, tmp_path / "whole", optimizer)) == 0
    with monkeypatch.context() as patch:
        _interrupt_at_forward(patch, 5 if optimizer == "zo" else 3)  # in step 3 (zo: its first probe)
        assert main(_args(llama_dir, data, tmp_path / "stopped", optimizer)) == 130
    checkpoints = tmp_path / "stopped-checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "interrupted"]
    assert json.loads((checkpoints / "interrupted" / "trainer_state.json").read_text())["step"] == 3
    assert main(_args(llama_dir, data, tmp_path / "stopped", optimizer, "--resume")) == 0
    _assert_same_weights(tmp_path / "stopped", tmp_path / "whole")
    # Resuming from checkpoint-2 (a run killed after it) gives them too.
    killed = tmp_path / "killed-checkpoints"
    killed.mkdir()
    os.rename(checkpoints / "checkpoint-2", killed / "checkpoint-2")
    assert main(_args(llama_dir, data, tmp_path / "killed", optimizer, "--resume")) == 0
    _assert_same_weights(tmp_path / "killed", tmp_path / "whole")
    capsys.readouterr()


def test_resume_with_other_settings_is_refused_by_name(llama_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(llama_dir, data, out, "galore", "--max-steps", "4")) == 0  # checkpoint-2
    for changed, message in (
        (["--rank", "2"], "rank = 4, this run has 2"),
        (["--optimizer", "adamw"], "optimizer = 'galore', this run has 'adamw'"),
    ):
        resumed = [
            *_args(llama_dir, data, out, "galore", "--max-steps", "4", "--force", "--resume"),
            *changed,
        ]
        assert main(resumed) == 1
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--rank", "40"], "rank 40 is larger than a (32, 32) matrix"),
        (["--optimizer", "zo-dist"], "launch it with torchrun"),
        (["--lr", "-1"], "lr must be positive"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_bad_input_is_refused_with_one_message_and_nothing_written(
    llama_dir, data, tmp_path, capsys, more, message
):
    out = tmp_path / "out"
    assert main([*_args(llama_dir, data, out, "galore"), *more]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_model_is_refused(quantized_llama_dir, data, tmp_path, capsys):
    assert main(_args(quantized_llama_dir, data, tmp_path / "out", "adamw")) == 1
    assert "is a quantized checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["adamw", "galore-layerwise", "zo"])
def test_a_nan_loss_stops_and_keeps_the_last_good_weights(llama_dir, data, tmp_path, monkeypatch, optimizer):
    # The loss turns NaN in step 3: training stops there, and last-good holds the weights after step 2.
    calls, real = {"n": 0}, training.forward_batch
    per_step = 2 if optimizer == "zo" else 1

    def forward(model, batch):
        out = real(model, batch)
        calls["n"] += 1
        if calls["n"] > 2 * per_step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(training, "forward_batch", forward)
    config = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, save_every=2)
    out = tmp_path / "out"
    with pytest.raises(WeightkitError, match="the loss is nan at step 3"):
        train_model(llama_dir, out, config, optimizer=optimizer, rank=4, data=data, progress=False)
    checkpoints = tmp_path / "out-checkpoints"
    assert not out.exists()
    good, saved = _weights(checkpoints / "last-good"), _weights(checkpoints / "checkpoint-2")
    for name, tensor in saved.items():
        assert torch.isfinite(good[name]).all(), name
        if optimizer == "zo":  # the probes moved the weights and back: equal to within rounding
            torch.testing.assert_close(good[name], tensor, rtol=0, atol=1e-6)
        else:
            assert torch.equal(good[name], tensor), name


def test_an_encoder_trains_as_a_classifier_that_transformers_loads_with_its_labels(bert_dir, tmp_path):
    data = tmp_path / "reviews.jsonl"
    records = [{"text": f"the film was {w} and the cast was {w}", "label": w} for w in ("good", "bad") * 8]
    data.write_text("\n".join(json.dumps(r) for r in records))
    summary = train_model(
        bert_dir, tmp_path / "out", TrainConfig(max_steps=3, batch_size=4, lr=1e-3), optimizer="galore",
        rank=4, data=data, progress=False,
    )  # fmt: skip
    assert summary["task"] == "encoder" and "accuracy" in summary["eval"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", local_files_only=True)
    assert model.config.id2label == {0: "bad", 1: "good"}


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "weightkit.cli"]
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )


@pytest.mark.parametrize("optimizer", ["zo-dist", "galore"])
def test_two_torchrun_processes_end_with_identical_weights_and_say_so(llama_dir, data, tmp_path, optimizer):
    args = _args(llama_dir, data, tmp_path / "out", optimizer)
    run = _torchrun([a for a in args if a != "--json"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "all 2 processes hold identical weights" in log, log[-3000:]
    if optimizer == "zo-dist":
        assert "each step every process received 16 bytes" in log, log[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [("zo", "use --optimizer zo-dist"), ("galore-layerwise", "cannot run under torchrun")],
)
def test_optimizers_that_cannot_run_under_torchrun_are_refused_there(
    llama_dir, data, tmp_path, monkeypatch, optimizer, message
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before joining any group
    with pytest.raises(WeightkitError, match=message):
        train_model(llama_dir, tmp_path / "out", TrainConfig(max_steps=1), optimizer=optimizer, data=data)


class _Seen(Exception):
    """Stops a run at its first forward pass once the placement is recorded."""


def test_train_moves_the_model_to_the_device_it_is_given(llama_dir, data, tmp_path, monkeypatch):
    seen = {}

    def forward(model, batch):
        seen["parameters"] = {p.device for p in model.parameters()}
        raise _Seen

    monkeypatch.setattr(training, "forward_batch", forward)
    # transformers 5 re-kernelizes a loaded model on .train() (hub kernels), which knows no meta device.
    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    with pytest.raises(_Seen):
        train_model(llama_dir, tmp_path / "out", TrainConfig(max_steps=1), data=data, device="meta")
    assert seen["parameters"] == {torch.device("meta")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["galore", "zo"])
def test_train_trains_on_the_gpu(llama_dir, data, tmp_path, optimizer):
    summary = train_model(
        llama_dir, tmp_path / "out", TrainConfig(max_steps=2, batch_size=4), optimizer=optimizer, rank=4,
        data=data, device="cuda", progress=False,
    )  # fmt: skip
    assert summary["steps"] == 2 and AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None


def test_the_cli_offers_exactly_the_optimizers_train_model_builds():
    # The CLI keeps its own copy of the names so that --help does not import torch.
    from weightkit.cli.train import _OPTIMIZERS

    assert set(_OPTIMIZERS) == set(OPTIMIZERS)
