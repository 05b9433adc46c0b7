"""Every verb on a tiny random model of every architecture in tests/architectures.py, and the architecture
description (weightkit.arch) checked against the models transformers builds.

A cell of the matrix either works, checked by what a user relies on (the output loads in transformers or
PEFT and computes what it should), or is refused with the reason the table states.
"""

import pytest
import torch
from torch import nn

from weightkit.arch import block_layout, block_lists, folds, model_task
from weightkit.errors import WeightkitError
from weightkit.testing import TINY_CONFIGS, save_tiny, tiny_model, tiny_tokenizer

CALIBRATION = [
    "The weights of a neural network are the numbers it learned during training on text.",
    "Quantization keeps the same matrix with fewer bits per number, group by group.",
    "Merging combines what several fine-tunes of one base model learned into one model.",
    "An adapter adds a small trainable piece beside a frozen layer of a large model.",
] * 4


def _task(architecture: str) -> str:
    return model_task(tiny_model(architecture).config.to_dict())


def _inputs(task: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    if task == "vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    ids = torch.randint(4, 128, (2, 12), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = ids[:, :6]
    return inputs


def _output(model: nn.Module, task: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(task))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


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


@pytest.mark.parametrize("architecture", TINY_CONFIGS)
def test_awq_folds_leave_the_model_function_unchanged(architecture):
    from weightkit.compress.quant.calibrated import _divide_output

    model = tiny_model(architecture, seed=1)
    config = model.config.to_dict()
    task = model_task(config)
    before = _output(model, task)
    generator = torch.Generator().manual_seed(0)
    count = 0
    for name, blocks in block_lists(model):
        layout = block_layout(config, name)
        if layout.transposed:  # GPT-2: its Conv1D layers are not quantized (see tests/architectures.py)
            return
        for block in blocks:
            for fold in folds(layout, block):
                width = block.get_submodule(fold.readers[0]).in_features
                s = torch.rand(width, generator=generator) * 1.5 + 0.5
                with torch.no_grad():
                    _divide_output(block, fold, s)
                    for reader in fold.readers:
                        block.get_submodule(reader).weight.mul_(s)
                count += 1
    torch.testing.assert_close(_output(model, task), before, rtol=1e-4, atol=1e-4)
    assert count >= 2 * len(block_lists(model))


def test_unknown_architecture_works_without_a_layout_and_says_so():
    assert block_layout({"model_type": "nonesuch"}, "model.layers") is None
    with pytest.warns(UserWarning, match="no layer layout for model_type 'nonesuch'"):
        block_layout({"model_type": "nonesuch"}, "model.layers", purpose="AWQ's scaling folds")
    with pytest.raises(WeightkitError, match="has no list of repeated blocks"):
        block_lists(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(WeightkitError, match="'nonesuch' is not a causal LM"):
        model_task({"model_type": "nonesuch"})
