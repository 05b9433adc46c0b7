"""The training loop and ``weightkit adapt``: causal LM, classification head, NaN safety, torchrun/DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from weightkit.adapt import LoRAConfig, adapt, load_adapter
from weightkit.adapt.trainer import finetune, train_adapter
from weightkit.cli import main
from weightkit.errors import WeightkitError
from weightkit.registry import config_from_dict
from weightkit.runtime.training import TrainConfig, evaluate, make_batches, split_examples
from weightkit.testing import save_tiny, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

TEXTS = [f"the cat sat on the mat number {i} and the dog ran to the park" for i in range(40)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tiny_llama(seed=0), tmp_path_factory.mktemp("llama"), tiny_tokenizer())


def _classification_file(path, n=48):
    # The label is which of two words the text contains: learnable by a tiny encoder in a few steps.
    rows = [
        {"text": f"{'apple' if i % 2 else 'river'} is here {i}", "label": "fruit" if i % 2 else "water"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_cli_trains_a_causal_lm_adapter_that_peft_loads(llama_dir, tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS))
    before = _perplexity(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path)
    code = main([
        "adapt", str(llama_dir), "-o", str(tmp_path / "out"), "--data", str(data), "--rank", "4",
        "--max-steps", "30", "--lr", "1e-2", "--batch-size", "4", "--save-every", "10", "--json",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 30 and summary["trainable_parameters"] == 2 * (
        4 * 32 + 32 * 4 + 4 * 32 + 16 * 4
    )
    assert (tmp_path / "out-checkpoints" / "checkpoint-10" / "adapter_model.safetensors").is_file()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "out")
    after = _perplexity(peft, tmp_path)
    assert after < 0.9 * before, (before, after)
    assert summary["eval"]["perplexity"] == pytest.approx(after, rel=1e-3)


def test_cli_trains_a_dora_adapter_on_gpt2s_conv1d_layers_that_peft_loads(tmp_path, capsys):
    gpt2_dir = save_tiny(tiny_gpt2(seed=0), tmp_path / "gpt2", tiny_tokenizer())
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS))
    before = _perplexity(AutoModelForCausalLM.from_pretrained(gpt2_dir), tmp_path)
    code = main([
        "adapt", str(gpt2_dir), "-o", str(tmp_path / "out"), "--data", str(data), "--method", "dora",
        "--target", "re:.*\\.(c_attn|c_fc)", "--rank", "4", "--max-steps", "20", "--lr", "1e-2",
        "--batch-size", "4", "--json",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), tmp_path / "out")
    after = _perplexity(peft, tmp_path)
    assert after < 0.9 * before, (before, after)
    assert summary["eval"]["perplexity"] == pytest.approx(after, rel=1e-3)


def _perplexity(model, tmp_path):
    # The trainer's own held-out split of TEXTS (10%, seed 0) is reproduced with the same tokenizer.
    _, _, eval_texts, _ = split_examples(TEXTS, None, 0.1, 0)
    batches = make_batches(tiny_tokenizer(), eval_texts, None, batch_size=8, max_length=256)
    return evaluate(model, batches, classification=False)["perplexity"]


def test_cli_trains_an_encoder_classifier(tmp_path, capsys, monkeypatch):
    from weightkit.checkpoint.owner import OWNER_FILE
    from weightkit.checkpoint.writer import CheckpointWriter

    published, publish = [], CheckpointWriter._publish

    def spy(writer):  # what the directory holds when it is renamed into place (but the writer's owner record)
        published.append(sorted(p.name for p in writer._tmp.iterdir() if p.name != OWNER_FILE))
        publish(writer)

    monkeypatch.setattr(CheckpointWriter, "_publish", spy)
    model_dir = save_tiny(tiny_bert(seed=0), tmp_path / "bert", tiny_tokenizer(kind="encoder"))
    data = _classification_file(tmp_path / "cls.jsonl")
    code = main([
        "adapt", str(model_dir), "-o", str(tmp_path / "out"), "--data", str(data), "--rank", "4",
        "--target", "re:.*(query|value|dense)", "--epochs", "12", "--lr", "3e-3", "--json",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["eval"]["accuracy"] == 1.0
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == ["fruit", "water"]
    # The label names are part of the adapter directory when it is published, not added afterwards.
    assert published[-1] == [
        "adapter_config.json", "adapter_model.safetensors", "labels.json", "weightkit_manifest.json"
    ]  # fmt: skip
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"]


def test_a_trained_classifier_loads_with_its_head_and_labels_in_peft_and_weightkit(tmp_path, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification

    import weightkit
    import weightkit.adapt.trainer as trainer

    model_dir = save_tiny(tiny_bert(seed=0), tmp_path / "bert", tiny_tokenizer(kind="encoder"))
    words = {"fruit": "apple", "water": "river", "rock": "stone"}
    rows = [{"text": f"{words[label]} is here {i}", "label": label} for i in range(30) for label in words]
    data = tmp_path / "cls.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    trained, real_save = {}, trainer.save_adapter

    def keep(model, *args, **kwargs):  # the trained model, as it is saved at the end
        trained["model"] = model
        return real_save(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_adapter", keep)
    config = TrainConfig(max_steps=4, batch_size=8, lr=1e-2)
    finetune(model_dir, LoRAConfig(rank=4), tmp_path / "out", config, data=data, progress=False)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    assert saved["base_model_name_or_path"] == str(model_dir.resolve())
    names = json.loads((tmp_path / "out" / "labels.json").read_text())
    id2label = {0: "fruit", 1: "rock", 2: "water"}  # class ids in sorted label order
    assert dict(enumerate(names)) == id2label
    texts = ["apple is here", "a river and a stone"]
    batch = tiny_tokenizer(kind="encoder")(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trained["model"].eval()(**batch).logits
        peft = AutoPeftModelForSequenceClassification.from_pretrained(
            tmp_path / "out", id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
        )
        ours = weightkit.load(model_dir, adapter=tmp_path / "out")
        assert expected.shape == (2, 3) and expected.std() > 1e-3  # a trained head, not a constant
        for model in (peft, ours):
            torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-5)
            assert model.config.id2label == id2label
            assert model.config.label2id == {v: k for k, v in id2label.items()}
    # Without the labels PEFT builds the base's default two-label head and refuses the three-label one.
    with pytest.raises(RuntimeError, match="size mismatch"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "out")


def test_a_nan_loss_stops_training_and_keeps_the_last_good_adapter(tmp_path):
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
    calls = {"n": 0}

    def poison(module, args, output):  # the 4th forward returns NaN logits
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 4 else output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(WeightkitError, match="loss is nan at step 4.*last-good"):
        train_adapter(
            model, tiny_tokenizer(), TEXTS, None, tmp_path / "out",
            TrainConfig(max_steps=10, batch_size=4, lr=1e-2, eval_fraction=0), progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    good = load_adapter(tiny_llama(seed=0), tmp_path / "out-checkpoints" / "last-good")
    for (name, ours), (_, theirs) in zip(model.named_parameters(), good.named_parameters(), strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, msg=name)


def test_bad_options_are_refused_before_any_work(llama_dir, tmp_path):
    assert main(["adapt", str(llama_dir), "-o", str(tmp_path / "o"), "--option", "rnak=3"]) == 1
    assert main(["adapt", str(llama_dir), "-o", str(tmp_path / "o"), "--method", "lorra"]) == 1
    assert main(["adapt", str(llama_dir), "-o", str(tmp_path / "o"), "--target", "model.layers.0.q_prj"]) == 1
    assert not (tmp_path / "o").exists()


def test_adapt_help_lists_every_method_and_the_training_options(capsys):
    from weightkit.registry import names

    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in [*names("adapt"), "--max-steps", "--epochs", "--lr", "--batch-size", "--seed", "--target"]:
        assert word in text, word


def test_an_intrinsic_dimension_adapter_trains_d_numbers_from_the_cli_and_loads(llama_dir, tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS))
    before = _perplexity(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path)
    code = main([
        "adapt", str(llama_dir), "-o", str(tmp_path / "said"), "--method", "said", "--option", "dim=200",
        "--data", str(data), "--max-steps", "20", "--lr", "0.05", "--batch-size", "4", "--json",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_parameters"] == 200
    loaded = load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "said")
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == 200
    after = _perplexity(loaded, tmp_path)
    assert after < 0.95 * before and summary["eval"]["perplexity"] == pytest.approx(after, rel=1e-3)
    # Its size is --option dim; --rank is refused rather than ignored.
    assert main(["adapt", str(llama_dir), "-o", str(tmp_path / "x"), "--method", "said", "--rank", "4"]) == 1


# Run under torchrun: reports every write a process starts (a CheckpointWriter, Path.write_text), then either
# runs the weightkit CLI ("cli ARGS...") or trains an adapter whose loss is NaN on process 1 at its third
# step ("nan OUT").
TORCHRUN_SCRIPT = """
import os, pathlib, sys

import torch

from weightkit.checkpoint import writer

rank = os.environ["RANK"]


def say(line):
    # One write() per line: both processes share the pipe, and print()'s text and newline can interleave.
    os.write(1, (line + "\\n").encode())


for owner, name in ((writer.CheckpointWriter, "__init__"), (pathlib.Path, "write_text")):
    def spy(self, *args, _real=getattr(owner, name), **kwargs):
        target = self if isinstance(self, pathlib.Path) else args[0]
        say(f"WRITE rank {rank} {target}")
        return _real(self, *args, **kwargs)
    setattr(owner, name, spy)

if sys.argv[1] == "cli":
    from weightkit.cli import main
    sys.exit(main(sys.argv[2:]))

from weightkit.adapt import LoRAConfig, adapt, train_adapter
from weightkit.errors import WeightkitError
from weightkit.runtime.training import TrainConfig
from weightkit.testing import tiny_llama, tiny_tokenizer

model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
calls = []
def poison(module, args, output):
    calls.append(1)
    return output * float("nan") if rank == "1" and len(calls) == 3 else output
model.model.norm.register_forward_hook(poison)
texts = [f"the cat sat on the mat number {i} and the dog ran to the park" for i in range(40)]
try:
    train_adapter(
        model, tiny_tokenizer(), texts, None, sys.argv[2], TrainConfig(max_steps=10, batch_size=2, lr=1e-2),
        progress=False,
    )
except WeightkitError as err:
    say(f"ERROR rank {rank}: {err}")
    torch.distributed.barrier()  # both have reported before either exits (torchrun then stops the other)
    sys.exit(3)
"""


def _torchrun(tmp_path, *args, timeout=300):
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), *args]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        try:
            stdout, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.terminate()  # torchrun stops its worker processes on SIGTERM
            run.communicate(timeout=60)
            pytest.fail(f"torchrun still running after {timeout} s: a process is waiting for the others")
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def _writers(stdout):
    """``{rank: the paths it wrote}``."""
    writes = {}
    for line in stdout.splitlines():
        if line.startswith("WRITE rank"):
            _, _, rank, path = line.split(maxsplit=3)
            writes.setdefault(rank, []).append(path)
    return writes


def test_torchrun_ddp_equals_one_process_with_the_combined_batch_and_only_process_0_writes(tmp_path):
    # Without dropout, two processes on half batches take the very steps one process takes on whole ones.
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model_dir = save_tiny(tiny_bert(seed=0, **no_dropout), tmp_path / "bert", tiny_tokenizer(kind="encoder"))
    data = _classification_file(tmp_path / "cls.jsonl", n=32)
    common = ["adapt", str(model_dir), "--data", str(data), "--rank", "2", "--max-steps", "3", "--lr", "1e-2"]
    common += ["--device", "cpu", "--save-every", "2"]
    run = _torchrun(tmp_path, "cli", *common, "-o", str(tmp_path / "ddp"), "--batch-size", "4", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    # The checkpoint and the adapter (labels.json inside it), written by process 0 alone.
    writes = _writers(run.stdout)
    assert list(writes) == ["0"] and {Path(p).name for p in writes["0"]} >= {"checkpoint-2", "ddp"}, writes
    assert json.loads((tmp_path / "ddp" / "labels.json").read_text()) == ["fruit", "water"]
    assert main([*common, "-o", str(tmp_path / "one"), "--batch-size", "8", "--json"]) == 0
    from safetensors.torch import load_file

    ddp = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_nan_on_one_process_stops_every_process_and_process_0_keeps_the_last_good_adapter(tmp_path):
    # Process 1's loss is NaN at step 3; process 0's is fine. Both must stop at once (not wait forever in
    # DDP's all-reduce), with the error, and process 0 alone saves the adapter as it was after step 2.
    run = _torchrun(tmp_path, "nan", str(tmp_path / "out"), timeout=120)
    assert run.returncode != 0
    errors = sorted(line for line in run.stdout.splitlines() if line.startswith("ERROR rank"))
    assert len(errors) == 2, run.stdout + run.stderr[-3000:]
    for rank, line in enumerate(errors):
        assert line.startswith(f"ERROR rank {rank}: the loss is nan on process 1 at step 3; training stopped")
    writes = _writers(run.stdout)
    assert list(writes) == ["0"] and {Path(p).name for p in writes["0"]} >= {"last-good"}, writes
    assert not (tmp_path / "out").exists()
    good = load_adapter(tiny_llama(seed=0), tmp_path / "out-checkpoints" / "last-good")
    fresh = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
    pairs = zip(good.named_parameters(), fresh.named_parameters(), strict=True)
    moved = [not torch.equal(p, q) for (n, p), (_, q) in pairs if "lora_B" in n]
    assert moved and all(moved)  # two steps were taken and kept


def _spy_on_adapt(monkeypatch):
    """Record the config and initialisation batches ``weightkit adapt`` passes to ``adapt``."""
    import weightkit.adapt.trainer

    calls, real = [], weightkit.adapt.trainer.adapt

    def spy(model, config, **kwargs):
        calls.append({"config": config, "data": kwargs.get("data")})
        return real(model, config, **kwargs)

    monkeypatch.setattr(weightkit.adapt.trainer, "adapt", spy)
    return calls


def _token_rows(batches):
    return {
        tuple(ids[mask == 1].tolist())
        for b in batches
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    }


@pytest.mark.parametrize("method", ["eva", "lora_sb"])
def test_initialisation_data_holds_no_held_out_example(llama_dir, tmp_path, monkeypatch, method):
    # EVA's activations and LoRA-SB's gradient come from the training part; the held-out 10% is split first.
    calls = _spy_on_adapt(monkeypatch)
    # 40 distinct texts (the tiny tokenizer has no digits: words tell them apart).
    animals, places = (
        ["cat", "dog", "fox", "bird", "fish"],
        ["mat", "park", "river", "sun", "road", "tree", "lake", "hill"],
    )
    texts = [f"the {a} sat by the {p} while the model learned" for a in animals for p in places]
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(texts))
    code = main([
        "adapt", str(llama_dir), "-o", str(tmp_path / "out"), "--method", method, "--data", str(data),
        "--rank", "2", "--max-steps", "1", "--batch-size", "4", "--json",
    ])  # fmt: skip
    assert code == 0
    _, _, eval_texts, _ = split_examples(texts, None, 0.1, 0)
    held_out = _token_rows(make_batches(tiny_tokenizer(128), eval_texts, None, batch_size=4, max_length=256))
    init_rows = _token_rows(calls[0]["data"])
    assert len(held_out) == 4 and len(init_rows) == 32 and not init_rows & held_out


@pytest.mark.parametrize(("lr", "warmup", "expected"), [(3e-3, 0, 3e-3), (4e-3, 3, 1e-3)])
def test_lora_sb_takes_the_runs_first_step_learning_rate(
    llama_dir, tmp_path, monkeypatch, lr, warmup, expected
):
    # As the authors' scripts: the simulated first step uses the learning rate the run starts with.
    calls = _spy_on_adapt(monkeypatch)
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS))
    args = ["adapt", str(llama_dir), "-o", str(tmp_path / "out"), "--method", "lora_sb", "--rank", "2"]
    args += ["--data", str(data)]
    args += [
        "--lr",
        str(lr),
        "--warmup-steps",
        str(warmup),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--json",
    ]
    assert main(args) == 0
    assert calls[0]["config"].init_lr == pytest.approx(expected)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["init_lr"] == pytest.approx(expected)
    # An init_lr the user gives is kept.
    args[3] = str(tmp_path / "given")
    assert main([*args, "--option", "init_lr=5e-4"]) == 0
    assert calls[1]["config"].init_lr == 5e-4


class _Seen(Exception):
    """Stops a run at its first module call on a tensor, once its placement is recorded."""


@pytest.mark.parametrize("method", ["eva", "lora_sb"])
def test_finetune_moves_the_model_to_the_device_before_initialising(llama_dir, tmp_path, method):
    # EVA's activations and LoRA-SB's gradient come from the model on the device. (Training on the device is
    # tests/runtime's; a transformers model in training mode cannot be put on "meta".)
    from torch.nn.modules.module import register_module_forward_pre_hook

    from weightkit.adapt import finetune

    seen = {}

    def hook(module, args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors:
            seen["input"] = tensors[0].device
            seen["parameters"] = {p.device for p in module.parameters()}
            raise _Seen

    handle = register_module_forward_pre_hook(hook)
    try:
        with pytest.raises(_Seen):
            finetune(
                llama_dir, config_from_dict("adapt", {"method": method, "rank": 2}), tmp_path / "out",
                TrainConfig(max_steps=1, batch_size=4), data=None, device="meta", progress=False,
            )  # fmt: skip
    finally:
        handle.remove()
    assert seen == {"input": torch.device("meta"), "parameters": {torch.device("meta")}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_device_is_refused_before_any_work(llama_dir, tmp_path, capsys):
    assert main(["adapt", str(llama_dir), "-o", str(tmp_path / "out"), "--device", "cuda"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_trains_on_the_gpu_by_default(llama_dir, tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS))
    args = ["adapt", str(llama_dir), "-o", str(tmp_path / "out"), "--data", str(data), "--max-steps", "2"]
    assert main([*args, "--method", "eva", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_torchrun_on_two_gpus_trains_over_nccl_one_gpu_each(llama_dir, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS))
    args = ["adapt", str(llama_dir), "--data", str(data), "--rank", "2", "--max-steps", "3", "--json"]
    run = _torchrun(tmp_path, "cli", *args, "-o", str(tmp_path / "ddp"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(_writers(run.stdout)) == ["0"]
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("flag", "dtype"), [(None, torch.float32), ("--no-autocast-adapter-dtype", torch.bfloat16)]
)
def test_a_bf16_checkpoint_trains_a_float32_adapter_unless_told_to_keep_its_dtype(tmp_path, flag, dtype):
    from safetensors.torch import load_file

    model_dir = save_tiny(tiny_llama(seed=0).to(torch.bfloat16), tmp_path / "bf16", tiny_tokenizer())
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(TEXTS))
    args = ["adapt", str(model_dir), "-o", str(tmp_path / "out"), "--data", str(data), "--max-steps", "2"]
    assert main([*args, "--rank", "2", "--json", *([flag] if flag else [])]) == 0
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {dtype}
