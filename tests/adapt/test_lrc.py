"""``--method lrc``: WeLore's LRC fine-tuning trains the low-rank factors only, saves the checkpoint in the
lowrank format, lowers the training loss, resumes to the same result, and refuses what it cannot train."""

import dataclasses
import shutil

import pytest
import torch

import weightkit
from weightkit.adapt.lrc import finetune_lrc
from weightkit.cli import main
from weightkit.compress import WeLoreConfig, compress_checkpoint
from weightkit.errors import WeightkitError
from weightkit.models import load_tokenizer
from weightkit.quantized.lowrank import LowRankLinear
from weightkit.runtime.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = TrainConfig(max_steps=4, lr=1e-2, batch_size=4, max_length=32, seed=0)


@pytest.fixture(scope="module")
def welore_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("welore") / "model"
    return compress_checkpoint(llama_dir, out, WeLoreConfig(rank_reduction=0.5), progress=False)


def training_loss(model, welore_dir, text_file) -> float:
    tokenizer = load_tokenizer(welore_dir)
    texts = text_file.read_text().split("\n\n")[:8]
    batch = tokenizer(texts, return_tensors="pt", truncation=True, max_length=32, padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def test_only_the_lrc_factors_change_and_the_loss_falls(welore_dir, text_file, tmp_path):
    summary = finetune_lrc(welore_dir, tmp_path / "ft", TRAIN, data=text_file, progress=False)
    before, after = weightkit.load(welore_dir), weightkit.load(tmp_path / "ft")
    lrcs = {n for n, m in after.named_modules() if isinstance(m, LowRankLinear)}
    assert lrcs == {n for n, m in before.named_modules() if isinstance(m, LowRankLinear)} and lrcs
    assert summary["lrc_layers"] == len(lrcs)
    trained = dict(after.named_parameters())
    for name, param in before.named_parameters():
        factor = name.rsplit(".", 1)[0] in lrcs and name.endswith(("weight_up", "weight_down"))
        assert torch.equal(param, trained[name]) != factor, name
    assert summary["trainable_parameters"] == sum(
        p.numel() for n, p in before.named_parameters() if n.endswith(("weight_up", "weight_down"))
    )
    assert training_loss(after, welore_dir, text_file) < training_loss(before, welore_dir, text_file)


def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(welore_dir, text_file, tmp_path):
    config = dataclasses.replace(TRAIN, save_every=2)
    finetune_lrc(welore_dir, tmp_path / "whole", config, data=text_file, progress=False)
    # A run killed after its step-2 checkpoint.
    shutil.copytree(
        tmp_path / "whole-checkpoints" / "checkpoint-2", tmp_path / "killed-checkpoints" / "checkpoint-2"
    )
    finetune_lrc(welore_dir, tmp_path / "killed", config, data=text_file, progress=False, resume=True)
    whole, resumed = weightkit.load(tmp_path / "whole"), weightkit.load(tmp_path / "killed")
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_without_low_rank_layers_is_refused(llama_dir, tmp_path):
    with pytest.raises(WeightkitError, match="has no low-rank components"):
        finetune_lrc(llama_dir, tmp_path / "ft", TRAIN, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_adapter_flags_are_refused_for_lrc(welore_dir, tmp_path, capsys):
    code = main(["adapt", str(welore_dir), "-o", str(tmp_path / "ft"), "--method", "lrc", "--rank", "4"])
    assert code == 1 and "--rank does not apply to method lrc" in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_over_low_rank_layers_is_refused_instead_of_skipping_them(welore_dir):
    from weightkit.adapt import LoRAConfig, adapt

    with pytest.raises(WeightkitError, match="is a LowRankLinear layer .* --method lrc"):
        adapt(weightkit.load(welore_dir), LoRAConfig(rank=2, targets=["all-linear"]))
