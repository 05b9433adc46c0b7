"""The training loop and ``weightkit adapt``: causal LM, classification head, NaN safety, torchrun/DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from weightkit.adapt import LoRAConfig, adapt, load_adapter
from weightkit.adapt.trainer import TrainConfig, evaluate, make_batches, split_examples, train_adapter
from weightkit.cli import main
from weightkit.errors import WeightkitError
from weightkit.testing import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer

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


def _perplexity(model, tmp_path):
    # The trainer's own held-out split of TEXTS (10%, seed 0) is reproduced with the same tokenizer.
    _, _, eval_texts, _ = split_examples(TEXTS, None, 0.1, 0)
    batches = make_batches(tiny_tokenizer(), eval_texts, None, batch_size=8, max_length=256)
    return evaluate(model, batches, classification=False)["perplexity"]


def test_cli_trains_an_encoder_classifier(tmp_path, capsys):
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
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"]


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


def test_torchrun_ddp_equals_one_process_with_the_combined_batch(tmp_path):
    # Without dropout, two processes on half batches take the very steps one process takes on whole ones.
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model_dir = save_tiny(tiny_bert(seed=0, **no_dropout), tmp_path / "bert", tiny_tokenizer(kind="encoder"))
    data = _classification_file(tmp_path / "cls.jsonl", n=32)
    common = ["adapt", str(model_dir), "--data", str(data), "--rank", "2", "--max-steps", "3", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "weightkit.cli"]
    subprocess.run(
        [*torchrun, *common, "-o", str(tmp_path / "ddp"), "--batch-size", "4", "--json"],
        check=True,
        env=env,
        capture_output=True,
    )
    assert main([*common, "-o", str(tmp_path / "one"), "--batch-size", "8", "--json"]) == 0
    from safetensors.torch import load_file

    ddp = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


def _spy_on_adapt(monkeypatch):
    """Record the config and initialisation batches ``weightkit adapt`` passes to ``adapt``."""
    import weightkit.adapt

    calls, real = [], weightkit.adapt.adapt

    def spy(model, config, **kwargs):
        calls.append({"config": config, "data": kwargs.get("data")})
        return real(model, config, **kwargs)

    monkeypatch.setattr(weightkit.adapt, "adapt", spy)
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
    args = ["adapt", str(llama_dir), "-o", str(tmp_path / "out"), "--method", "lora_sb", "--rank", "2"]
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
