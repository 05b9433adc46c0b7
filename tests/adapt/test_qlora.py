"""LoRA over a quantized model's frozen ``QuantizedLinear`` layers (QLoRA): trained, saved in PEFT's format,
applied again by weightkit and by PEFT, the quantized weights never touched."""

import pytest
import torch
from peft import PeftModel
from sample_texts import TEXTS
from transformers import AutoModelForCausalLM

import weightkit
from weightkit.adapt import LoRAConfig, adapt, merge_and_unload, set_active_adapters
from weightkit.adapt.bone import BoneConfig
from weightkit.adapt.trainer import finetune, train_adapter
from weightkit.errors import WeightkitError
from weightkit.models import load_model
from weightkit.quantized.linear import QuantizedLinear
from weightkit.runtime.training import TrainConfig, evaluate, make_batches, split_examples
from weightkit.testing import tiny_tokenizer

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN = TrainConfig(max_steps=20, lr=1e-2, batch_size=4, max_length=64)


def _quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _dequantized_base(llama_dir, quantized_dir):
    """The full-precision model with the quantized checkpoint's weights, dequantized, as its dense weights."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        for name, layer in _quantized_layers(load_model(quantized_dir)[0]).items():
            model.get_submodule(name).weight.copy_(layer.dequantized_weight())
    return model


def test_finetune_trains_a_lora_over_a_quantized_model_that_peft_applies(
    quantized_llama_dir, llama_dir, text_file, tmp_path
):
    out = tmp_path / "adapter"
    config = LoRAConfig(rank=4, alpha=8, targets=["all-linear"])
    summary = finetune(quantized_llama_dir, config, out, TRAIN, data=text_file, progress=False)

    # all-linear takes every quantized projection, and leaves the (unquantized) output head alone.
    adapted = weightkit.load(quantized_llama_dir, adapter=out)
    wrapped = [n for n, m in adapted.named_modules() if hasattr(m, "base_layer")]
    assert len(wrapped) == 2 * len(LINEARS) and all(n.endswith(LINEARS) for n in wrapped)
    assert all(isinstance(adapted.get_submodule(n).base_layer, QuantizedLinear) for n in wrapped)

    # Training lowered the loss on the training texts (the trainer's own split, reproduced).
    train_texts, _, eval_texts, _ = split_examples(TEXTS, None, TRAIN.eval_fraction, TRAIN.seed)
    tokenizer = tiny_tokenizer(128)
    batches = make_batches(tokenizer, train_texts, None, batch_size=4, max_length=TRAIN.max_length)
    base = load_model(quantized_llama_dir)[0]
    before = evaluate(base, batches, classification=False)["eval_loss"]
    after = evaluate(adapted, batches, classification=False)["eval_loss"]
    assert after < before - 0.05, (before, after)  # an untrained adapter (B = 0) changes nothing
    # The model trained in memory and the one loaded back from the files compute the same.
    held_out = make_batches(tokenizer, eval_texts, None, batch_size=4, max_length=TRAIN.max_length)
    perplexity = evaluate(adapted, held_out, classification=False)["perplexity"]
    assert perplexity == pytest.approx(summary["eval"]["perplexity"], rel=1e-5)

    # PEFT applies the adapter to the full-precision model (same module names) ...
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    fp = AutoModelForCausalLM.from_pretrained(llama_dir)
    on_fp = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out), tokens)
    assert not torch.allclose(on_fp, _logits(fp, tokens), atol=1e-3)
    # ... and, on the dequantized weights, computes exactly what weightkit's QuantizedLinear + LoRA does.
    peft_dequantized = PeftModel.from_pretrained(_dequantized_base(llama_dir, quantized_llama_dir), out)
    torch.testing.assert_close(
        _logits(peft_dequantized, tokens), _logits(adapted, tokens), rtol=1e-5, atol=1e-5
    )


def test_a_dora_adapter_trains_over_quantized_layers_without_changing_them(quantized_llama_dir, tmp_path):
    model, tokenizer, _ = load_model(quantized_llama_dir)
    frozen = {
        name: {k: t.clone() for k, t in m.state_dict().items()}
        for name, m in _quantized_layers(model).items()
    }
    adapt(model, LoRAConfig(rank=4, alpha=8, dora=True, rslora=True, targets=["all-linear"]))
    magnitudes = {k: p.detach().clone() for k, p in model.named_parameters() if "lora_magnitude_vector" in k}
    summary = train_adapter(model, tokenizer, TEXTS, None, tmp_path / "adapter", TRAIN, progress=False)
    assert summary["steps"] == TRAIN.max_steps

    # The quantized layers' tensors (grid values, scales, zero points, biases) are bit-identical; DoRA
    # trained its magnitudes against the dequantized weight.
    after = {name.removesuffix(".base_layer"): m for name, m in _quantized_layers(model).items()}
    assert set(after) == set(frozen) and len(frozen) == 2 * len(LINEARS)
    for name, tensors in frozen.items():
        for key, tensor in after[name].state_dict().items():
            assert torch.equal(tensor, tensors[key]), (name, key)
    changed = [
        k for k, p in model.named_parameters() if k in magnitudes and not torch.equal(p, magnitudes[k])
    ]
    assert len(changed) == len(magnitudes)

    # weightkit.load(quantized, adapter=...) gives the model that was trained.
    model.eval()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    loaded = weightkit.load(quantized_llama_dir, adapter=tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoRAConfig(init="pissa"), "init='pissa' does not work on a QuantizedLinear layer"),
        (LoRAConfig(init="olora"), "init='olora' does not work on a QuantizedLinear layer"),
        (LoRAConfig(init="eva"), "init='eva' does not work on a QuantizedLinear layer"),
        (
            BoneConfig(rank=4),
            "is a QuantizedLinear layer (int4, of a quantized checkpoint): BoneLinear adapters",
        ),
    ],
)
def test_methods_that_need_the_dense_weight_refuse_quantized_layers(quantized_llama_dir, config, message):
    model = load_model(quantized_llama_dir)[0]
    with pytest.raises(WeightkitError) as err:
        adapt(model, config)
    assert message in str(err.value)
    assert not [m for m in model.modules() if hasattr(m, "base_layer")]  # refused before wrapping anything


def test_merging_into_a_quantized_layer_is_refused(quantized_llama_dir):
    model = load_model(quantized_llama_dir)[0]
    adapt(model, LoRAConfig(rank=2))
    set_active_adapters(model, [])  # switching adapters unmerges: nothing to undo on a quantized layer
    set_active_adapters(model, ["default"])
    with pytest.raises(WeightkitError, match="cannot merge adapter 'default' into a QuantizedLinear layer"):
        merge_and_unload(model)
