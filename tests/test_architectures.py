"""Every verb on a tiny random model of every architecture in tests/architectures.py, and the architecture
description (weightkit.arch) checked against the models transformers builds.

A cell of the matrix either works, checked by what a user relies on (the output loads in transformers or
PEFT and computes what it should), or is refused with the reason the table states.
"""

import warnings

import pytest
import torch
from architectures import ARCHITECTURES, REFUSALS, RUN_DECOMPRESSED, expected
from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

from weightkit import load
from weightkit.adapt import LoRAConfig, adapt, save_adapter
from weightkit.arch import block_layout, block_lists, folds, model_task
from weightkit.compress import AWQConfig, GPTQConfig, RTNConfig
from weightkit.compress.stream import compress_checkpoint
from weightkit.errors import WeightkitError
from weightkit.models import load_model, model_auto_class
from weightkit.testing import TINY_CONFIGS, model_output, save_tiny, tiny_model, tiny_tokenizer

CALIBRATION = [
    "The weights of a neural network are the numbers it learned during training on text.",
    "Quantization keeps the same matrix with fewer bits per number, group by group.",
    "Merging combines what several fine-tunes of one base model learned into one model.",
    "An adapter adds a small trainable piece beside a frozen layer of a large model.",
] * 4
CLOSE = {"rtol": 1e-4, "atol": 1e-4}  # float32 outputs of the same function computed two ways


def _task(architecture: str) -> str:
    return model_task(tiny_model(architecture).config.to_dict())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir(architecture, seed)``: a saved tiny model with a tokenizer (none for image models)."""
    saved = {}

    def make(architecture: str, seed: int = 0):
        if (architecture, seed) not in saved:
            model = tiny_model(architecture, seed)
            task = model_task(model.config.to_dict())
            tokenizer = (
                None
                if task == "vision"
                else tiny_tokenizer(128, kind="encoder" if task == "encoder" else "causal-lm")
            )
            path = tmp_path_factory.mktemp(architecture) / f"seed{seed}"
            saved[architecture, seed] = save_tiny(model, path, tokenizer)
        return saved[architecture, seed]

    return make


# -- the description ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", TINY_CONFIGS)
def test_layout_names_the_linear_layers_of_every_block(architecture):
    model = tiny_model(architecture)
    config = model.config.to_dict()
    assert model_task(config) == {
        "bert": "encoder",
        "roberta": "encoder",
        "t5": "seq2seq",
        "vit": "vision",
    }.get(architecture, "causal-lm")
    lists = block_lists(model)
    assert [len(blocks) for _, blocks in lists] == [2] * len(lists)
    for name, blocks in lists:
        layout = block_layout(config, name)
        roles = {*layout.attention, layout.attention_out, *layout.mlp_in} | ({layout.mlp_out} - {None})
        for block in blocks:
            linears = {
                n
                for n, m in block.named_modules()
                if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
            }
            cross_attention = {n for n in linears if "EncDecAttention" in n}  # T5's decoder reads the encoder
            assert linears - cross_attention == roles
            for norm in {layout.attention_norm, layout.mlp_norm} - {None}:
                assert block.get_submodule(norm).weight.dim() == 1


def _fold_random_scales(model: nn.Module) -> int:
    """Fold random AWQ scales (0.5 to 2) into every fold of every block, as AWQ does; returns how many."""
    from weightkit.compress.quant.calibrated import _divide_output

    generator, count = torch.Generator().manual_seed(0), 0
    for name, blocks in block_lists(model):
        layout = block_layout(model.config.to_dict(), name)
        for block in blocks:
            for fold in folds(layout, block):
                s = (
                    torch.rand(block.get_submodule(fold.readers[0]).in_features, generator=generator) * 1.5
                    + 0.5
                )
                with torch.no_grad():
                    _divide_output(block, fold, s)
                    for reader in fold.readers:
                        block.get_submodule(reader).weight.mul_(s)
                count += 1
    return count


@pytest.mark.parametrize("architecture", [a for a in TINY_CONFIGS if a != "gpt2"])  # Conv1D: not quantized
def test_awq_folds_leave_the_model_function_unchanged(architecture):
    model = tiny_model(architecture, seed=1)
    task = model_task(model.config.to_dict())
    before = model_output(model, task)
    assert _fold_random_scales(model) >= 2 * len(block_lists(model))
    torch.testing.assert_close(model_output(model, task), before, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_works_without_a_layout_and_says_so():
    assert block_layout({"model_type": "nonesuch"}, "model.layers") is None
    with pytest.warns(UserWarning, match="no layer layout for model_type 'nonesuch'"):
        block_layout({"model_type": "nonesuch"}, "model.layers", purpose="AWQ's scaling folds")
    with pytest.raises(WeightkitError, match="has no list of repeated blocks"):
        block_lists(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(WeightkitError, match="'nonesuch' is not a causal LM"):
        model_task({"model_type": "nonesuch"})


# -- every verb on every architecture ------------------------------------------------------------------------


def _refused(architecture: str, verb: str, run) -> bool:
    """Run ``run()``; if the table says the verb refuses the architecture, check it does, with the reason."""
    reason = expected(architecture, verb)
    if reason.startswith("yes"):
        run()
        return False
    with pytest.raises(WeightkitError, match=REFUSALS[reason]):
        run()
    return True


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_adapter_api_and_peft_agree(architecture, tmp_path, model_dir):
    """adapt (the API) on every Linear, saved in PEFT's format: PEFT loads it onto the base with the same
    outputs, and merge-adapter's streamed merge loads in transformers with those outputs too."""
    from weightkit.adapt.merged_reader import merge_adapter_checkpoint

    base = model_dir(architecture)
    model, _, task = load_model(base)
    adapt(model, LoRAConfig(rank=4, alpha=8, targets=["all-linear"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    adapted = model_output(model, task)
    save_adapter(model, tmp_path / "adapter", base_model=str(base))
    peft_model = PeftModel.from_pretrained(load_model(base)[0], tmp_path / "adapter")
    torch.testing.assert_close(model_output(peft_model, task), adapted, **CLOSE)
    assert not torch.allclose(model_output(load_model(base)[0], task), adapted, atol=1e-3)

    merge_adapter_checkpoint(base, tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = model_auto_class(task).from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    torch.testing.assert_close(model_output(merged, task), adapted, **CLOSE)


def _transformers_load(path, architecture: str) -> nn.Module:
    """A quantized output loaded by transformers; Falcon's and T5's weight initialisation in transformers 5
    reads every Linear's .weight, which compressed-tensors' packed layers lack, so those load decompressed."""
    from transformers import CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(run_compressed=False)}
    cls = model_auto_class(_task(architecture))
    return cls.from_pretrained(
        path, local_files_only=True, **(kwargs if architecture in RUN_DECOMPRESSED else {})
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_compress_rtn_loads_in_transformers(architecture, tmp_path, model_dir):
    base = model_dir(architecture)
    out = tmp_path / "rtn"
    if _refused(
        architecture,
        "compress rtn",
        lambda: compress_checkpoint(base, out, RTNConfig(bits=8, group_size=None), progress=False),
    ):
        return
    task = _task(architecture)
    ours = load(out)
    theirs = _transformers_load(out, architecture)
    original = model_output(load_model(base)[0], task)
    torch.testing.assert_close(model_output(theirs, task), model_output(ours, task), rtol=1e-4, atol=1e-4)
    # 8-bit per-channel rounding: close to the original, but not equal to it.
    error = (model_output(ours, task) - original).norm() / original.norm()
    assert 0 < error < 0.05, error


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_compress_calibrated_loads_in_transformers(architecture, method, tmp_path, model_dir):
    base = model_dir(architecture)
    out = tmp_path / method
    # Few texts and (AWQ) a coarse grid: this checks each architecture's path, not the methods' quality.
    if method == "gptq":
        config = GPTQConfig(bits=4, group_size=16, calib_samples=8)
    else:
        config = AWQConfig(bits=4, group_size=16, calib_samples=8, n_grid=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration tokens for the layers' widths: expected here
        if _refused(
            architecture,
            "compress gptq/awq",
            lambda: compress_checkpoint(base, out, config, data=CALIBRATION, progress=False),
        ):
            return
    task = _task(architecture)
    theirs = _transformers_load(out, architecture)
    torch.testing.assert_close(
        model_output(theirs, task), model_output(load(out), task), rtol=1e-4, atol=1e-4
    )
    original = model_output(load_model(base)[0], task)
    error = (model_output(theirs, task) - original).norm() / original.norm()
    assert 0 < error < 0.5, error


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_merge_and_extract_lora(architecture, tmp_path, model_dir):
    """A linear merge of two seeds is their average, loaded by transformers; a LoRA extracted from a
    fine-tune whose every linear weight moved by a rank-2 change, loaded by PEFT onto the base, computes
    the fine-tune's outputs."""
    from weightkit.merge import LinearConfig, merge
    from weightkit.merge.extract_lora import extract_lora

    a, b = model_dir(architecture, 0), model_dir(architecture, 1)
    task = _task(architecture)
    merge(None, [a, b], LinearConfig(), tmp_path / "merged", progress=False)
    merged = model_auto_class(task).from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    first, second = load_model(a)[0], load_model(b)[0]
    for (name, p), q in zip(first.named_parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(merged.get_parameter(name), (p + q) / 2, rtol=0, atol=1e-6)

    finetune, generator = load_model(a)[0], torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in finetune.modules():  # not the output layer: it may be the (tied) embeddings
            if isinstance(module, nn.Linear | Conv1D) and module is not finetune.get_output_embeddings():
                rows, cols = module.weight.shape
                change = torch.randn(rows, 2, generator=generator) @ torch.randn(2, cols, generator=generator)
                module.weight.add_(change * 0.05)
    finetune.save_pretrained(tmp_path / "finetune")
    summary = extract_lora(a, tmp_path / "finetune", tmp_path / "lora", rank=2, progress=False)
    assert summary["modules"] and summary["max_relative_error"] < 1e-4
    peft_model = PeftModel.from_pretrained(load_model(a)[0], tmp_path / "lora")
    torch.testing.assert_close(
        model_output(peft_model, task), model_output(finetune, task), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_eval(architecture, model_dir):
    from weightkit.eval import evaluate

    model, tokenizer, task = load_model(model_dir(architecture))
    texts = CALIBRATION[:2]
    if _refused(architecture, "eval", lambda: evaluate(model, tokenizer, task, texts, reference=model)):
        return
    metrics = evaluate(model, tokenizer, task, texts, reference=model)
    if task == "causal-lm":  # perplexity = exp(mean token loss), as transformers computes the loss
        nll = [model(**(b := tokenizer(t, return_tensors="pt")), labels=b["input_ids"]).loss for t in texts]
        counts = [len(tokenizer(t)["input_ids"]) - 1 for t in texts]
        mean = sum(float(n) * c for n, c in zip(nll, counts, strict=True)) / sum(counts)
        assert metrics["perplexity"] == pytest.approx(torch.tensor(mean).exp().item(), rel=1e-4)
    else:  # a model against itself: identical embeddings; against another seed: not
        assert metrics["embedding_fidelity"] == pytest.approx(1.0, abs=1e-6)
        other = load_model(model_dir(architecture, 1))[0]
        assert evaluate(model, tokenizer, task, texts, reference=other)["embedding_fidelity"] < 0.99


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fisher(architecture, tmp_path, model_dir):
    from safetensors.torch import load_file

    from weightkit.merge.fisher_compute import fisher_checkpoint

    out = tmp_path / "fisher.safetensors"

    def run():
        fisher_checkpoint(model_dir(architecture), None, out, samples=2, max_length=16, progress=False)

    if _refused(architecture, "fisher", run):
        return
    fisher = load_file(out)
    weights = load_file(model_dir(architecture) / "model.safetensors")
    assert fisher and set(fisher) <= set(weights)
    assert all(f.shape == weights[n].shape and (f >= 0).all() for n, f in fisher.items())
    assert sum(float(f.sum()) for f in fisher.values()) > 0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_adapt_trains(architecture, tmp_path, model_dir):
    """``weightkit adapt``'s trainer: two steps of LoRA on every linear layer; PEFT loads the result."""
    import json

    from weightkit.adapt.trainer import finetune
    from weightkit.runtime.training import TrainConfig

    data = tmp_path / "data.jsonl"
    labels = ["positive", "negative"]
    data.write_text(
        "\n".join(json.dumps({"text": t, "label": labels[i % 2]}) for i, t in enumerate(CALIBRATION))
    )
    train = TrainConfig(max_steps=2, batch_size=4, max_length=16, lr=1e-3)
    config = LoRAConfig(rank=2, targets=["all-linear"])
    base, out = model_dir(architecture), tmp_path / "adapter"
    if _refused(
        architecture, "adapt (train)", lambda: finetune(base, config, out, train, data=data, progress=False)
    ):
        return
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["peft_type"] == "LORA"
    if _task(architecture) == "causal-lm":  # a classifier's head needs the label count: see tests/adapt
        peft_model = PeftModel.from_pretrained(load_model(base)[0], out)
        trained = model_output(peft_model, "causal-lm")
        torch.testing.assert_close(
            trained, model_output(load(base, adapter=out), "causal-lm"), rtol=1e-4, atol=1e-4
        )
        assert not torch.allclose(trained, model_output(load_model(base)[0], "causal-lm"), atol=1e-4)


def test_a_model_type_without_a_layout_is_compressed_block_by_block_with_a_warning(tmp_path):
    """GPT-J has no layout in weightkit.arch: its blocks are found in the model, AWQ says it only clips,
    and the output loads in transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gptj", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=128, n_positions=64, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    base = save_tiny(AutoModelForCausalLM.from_config(config), tmp_path / "gptj", tiny_tokenizer(128))
    awq = AWQConfig(bits=4, group_size=16, calib_samples=8, n_grid=4)
    with pytest.warns(UserWarning, match="no layer layout for model_type 'gptj'"):
        compress_checkpoint(base, tmp_path / "awq", awq, data=CALIBRATION, progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "awq", local_files_only=True)
    torch.testing.assert_close(
        model_output(theirs, "causal-lm"), model_output(load(tmp_path / "awq"), "causal-lm")
    )
    assert sum(type(m).__name__ == "QuantizedLinear" for m in load(tmp_path / "awq").modules()) == 2 * 6


@pytest.mark.parametrize(
    "variant",
    [
        {"new_decoder_architecture": True, "num_kv_heads": 2},  # ln_attn and ln_mlp
        {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
        {"multi_query": False},  # one norm for attention and MLP, per-head fused rows
        {"parallel_attn": False},  # sequential: input_layernorm, then post_attention_layernorm
    ],
)
def test_awq_folds_of_every_falcon_variant_leave_the_model_function_unchanged(variant):
    from transformers import AutoModelForCausalLM, FalconConfig

    config = FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, **variant
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    before = model_output(model, "causal-lm")
    assert _fold_random_scales(model) >= 2
    torch.testing.assert_close(model_output(model, "causal-lm"), before, rtol=1e-4, atol=1e-4)


def test_every_architecture_is_aligned_in_test_align():
    # The align column of the table is tests/merge/test_align.py's per-architecture test over ALIGNED.
    from architectures import ALIGNED

    assert set(ALIGNED) == set(ARCHITECTURES)


def test_a_mixture_of_experts_is_compressed_whole_and_says_its_experts_stay_unquantized(tmp_path, model_dir):
    # transformers 5 merges the checkpoint's per-expert w1/w2/w3 into 3-D parameters on load: no name to
    # stream by, so the model is loaded whole; its experts are no Linear layers compressed-tensors can store.
    with pytest.warns(
        UserWarning, match=r"3-D parameters \(experts fused by transformers\).*stay unquantized"
    ):
        compress_checkpoint(
            model_dir("mixtral"), tmp_path / "q", RTNConfig(bits=4, group_size=16), progress=False
        )
    model = load(tmp_path / "q")
    quantized = {n for n, m in model.named_modules() if type(m).__name__ == "QuantizedLinear"}
    assert quantized == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}


@pytest.mark.parametrize("carry", [True, False])
def test_t5_blocks_replayed_with_the_first_blocks_position_biases_reproduce_both_stacks(carry):
    """GPTQ/AWQ run each block alone on captured inputs. T5's first block computes the position biases
    that T5Stack hands to every other block: carried, the replay is the stacks' own computation; not
    carried, the later blocks run without relative positions and it is not."""
    from weightkit.compress.quant.blockwise import capture_block_inputs, carry_outputs, run_batches
    from weightkit.data import tokenize_batches

    model, cpu = tiny_model("t5", seed=1), torch.device("cpu")
    batches = tokenize_batches(tiny_tokenizer(128), CALIBRATION[:4], max_length=16, batch_size=2)
    batches = [{**batch, "labels": batch["input_ids"]} for batch in batches]
    for name, blocks in block_lists(model):
        stack = model.get_submodule(name.rpartition(".")[0])
        inputs = capture_block_inputs(model, blocks[0], batches, cpu)
        if carry:
            carry_outputs(blocks[0], inputs, block_layout(model.config.to_dict(), name).carries, cpu)
        for block in blocks:
            inputs.hidden = run_batches(block, inputs, cpu)
        expected = []
        handle = stack.final_layer_norm.register_forward_pre_hook(
            lambda _m, args, out=expected: out.append(args[0])
        )
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        handle.remove()
        for replayed, reference in zip(inputs.hidden, expected, strict=True):
            assert torch.allclose(replayed, reference, atol=1e-5) == carry, name
