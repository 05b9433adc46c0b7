"""GPT-2's Conv1D layers (weights stored in x out, PEFT's fan_in_fan_out) in every adapter method.

The reference for each method is the same model with every Conv1D replaced by the equivalent nn.Linear
(the weight transposed): an adapter on the Conv1D must compute exactly what it computes on that Linear.
"""

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from weightkit.adapt import (
    BoneConfig,
    IncreLoRAConfig,
    LoRAConfig,
    LoRASBConfig,
    MoSConfig,
    SubspaceConfig,
    SVFitConfig,
    adapt,
    adapter_layers,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    unmerge_adapters,
)
from weightkit.testing import save_tiny, tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
CONV1D = ["re:.*\\.(c_attn|c_proj|c_fc)"]  # every Conv1D of GPT-2: 32x96, 32x32, 32x128, 128x32
PEFT_CONV1D = ["c_attn", "c_proj", "c_fc"]
BATCHES = [
    {"input_ids": ids, "labels": ids}
    for ids in torch.randint(0, 128, (4, 2, 12), generator=torch.Generator().manual_seed(0))
]
CLOSE = {"rtol": 0, "atol": 1e-5}


def _randomise(model, seed=0, scale=0.1):
    """Move every trainable tensor off its initial value, in parameter order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def _as_linear(model):
    """``model`` with each Conv1D replaced by the nn.Linear that computes the same (its weight transposed)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(*module.weight.shape)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def _adapted(model, config):
    torch.manual_seed(0)  # LoRA's Kaiming A: the same draws for the Conv1D model and its Linear twin
    return adapt(model, config, data=BATCHES)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# weightkit's LoRA configs on every Conv1D, and the PEFT LoraConfig fields for the same adapter.
LORA_KINDS = {
    "lora": (LoRAConfig(rank=4, alpha=8, targets=CONV1D), {}),
    "rslora": (LoRAConfig(rank=4, alpha=8, rslora=True, targets=CONV1D), {"use_rslora": True}),
    "dora": (LoRAConfig(rank=4, alpha=8, dora=True, targets=CONV1D), {"use_dora": True}),
    "pissa": (LoRAConfig(rank=4, alpha=8, init="pissa", targets=CONV1D), None),
    "eva": (LoRAConfig(rank=4, alpha=8, init="eva", eva_tau=0.0, targets=CONV1D), None),
}


@pytest.mark.parametrize("kind", list(LORA_KINDS))
def test_lora_on_conv1d_is_lora_on_the_linear_twin_and_loads_in_peft(tmp_path, kind):
    config, _ = LORA_KINDS[kind]
    base = _logits(tiny_gpt2())
    model = _adapted(tiny_gpt2(), config)
    twin = _adapted(_as_linear(tiny_gpt2()), config)
    torch.testing.assert_close(_logits(model), base, **CLOSE)  # a fresh adapter changes nothing
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Conv1D) and layer.lora_A["default"].weight.shape[1] == 32
    assert layer.lora_B["default"].weight.shape[0] == 96  # PEFT's shapes: A is r x in, B is out x r
    if kind == "dora":  # one magnitude per output feature: the norms of the stored weight's columns
        torch.testing.assert_close(
            layer.lora_magnitude_vector["default"], layer.base_layer.weight.norm(dim=0), rtol=1e-6, atol=0
        )
    _randomise(model)
    _randomise(twin)
    torch.testing.assert_close(_logits(model), _logits(twin), **CLOSE)

    base_dir = save_tiny(tiny_gpt2(), tmp_path / "base")
    saved = save_adapter(model, tmp_path / "ours", base_model=str(base_dir))
    assert json.loads((saved / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # PEFT overrode nothing
    torch.testing.assert_close(_logits(peft), _logits(model), **CLOSE)
    torch.testing.assert_close(_logits(load_adapter(tiny_gpt2(), saved)), _logits(model), **CLOSE)


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_a_peft_gpt2_adapter_loads_with_pefts_logits(tmp_path, kind):
    _, fields = LORA_KINDS[kind]
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=PEFT_CONV1D, fan_in_fan_out=True, **fields)
    peft = get_peft_model(tiny_gpt2(), peft_config)
    _randomise(peft, seed=1)
    peft.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert len(adapter_layers(ours)) == 8
    torch.testing.assert_close(_logits(ours), _logits(peft), **CLOSE)


def _set_field(adapter_dir, **fields):
    config_file = adapter_dir / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))


@pytest.mark.parametrize("model_fn", [tiny_gpt2, tiny_llama])
def test_a_fan_in_fan_out_that_misfits_the_layers_is_overridden_with_a_warning_as_in_peft(tmp_path, model_fn):
    # PEFT warns and reads a Conv1D with fan_in_fan_out=True, an nn.Linear with False, whatever the file says.
    gpt2 = model_fn is tiny_gpt2
    targets = CONV1D if gpt2 else ["re:.*(q_proj|v_proj)"]
    model = adapt(model_fn(), LoRAConfig(rank=2, targets=targets))
    _randomise(model)
    saved = save_adapter(model, tmp_path / "a", base_model=str(save_tiny(model_fn(), tmp_path / "base")))
    _set_field(saved, fan_in_fan_out=not gpt2)
    kind = "Conv1D" if gpt2 else "Linear"
    with pytest.warns(UserWarning, match=f"fan_in_fan_out={not gpt2} does not fit .* {kind} layer"):
        ours = load_adapter(model_fn(), saved)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to"):
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), saved)
    torch.testing.assert_close(_logits(ours), _logits(peft.eval()), **CLOSE)
    torch.testing.assert_close(_logits(ours), _logits(model), **CLOSE)


def test_an_adapter_on_conv1d_and_linear_layers_saves_fan_in_fan_out_and_loads_in_peft(tmp_path):
    # GPT-2's lm_head is an nn.Linear: one file, two layouts; PEFT reads each layer in its own.
    config = LoRAConfig(rank=2, dora=True, targets=["re:.*c_attn", "lm_head"])
    model = adapt(tiny_gpt2(), config)
    assert isinstance(model.lm_head.base_layer, nn.Linear)
    _randomise(model)
    base_dir = save_tiny(tiny_gpt2(), tmp_path / "base")
    saved = save_adapter(model, tmp_path / "a", base_model=str(base_dir))
    assert json.loads((saved / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved).eval()
    torch.testing.assert_close(_logits(peft), _logits(model), **CLOSE)
    with pytest.warns(UserWarning, match="does not fit 1 adapted Linear layer"):
        ours = load_adapter(tiny_gpt2(), saved)
    torch.testing.assert_close(_logits(ours), _logits(model), **CLOSE)


@pytest.mark.parametrize("dora", [False, True])
def test_merging_conv1d_adapters_gives_the_unmerged_outputs_and_pefts_merged_weights(tmp_path, dora):
    model = adapt(tiny_gpt2(), LoRAConfig(rank=4, alpha=8, dora=dora, targets=CONV1D))
    _randomise(model)
    adapted = _logits(model)
    weights = {n: layer.base_layer.weight.clone() for n, layer in adapter_layers(model).items()}
    merge_adapters(model)
    torch.testing.assert_close(_logits(model), adapted, **CLOSE)
    unmerge_adapters(model)
    for module_name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, weights[module_name], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model), adapted, **CLOSE)

    base_dir = save_tiny(tiny_gpt2(), tmp_path / "base")
    saved = save_adapter(model, tmp_path / "a", base_model=str(base_dir))
    merged = merge_and_unload(model)
    assert isinstance(merged.transformer.h[1].mlp.c_fc, Conv1D) and not adapter_layers(merged)
    torch.testing.assert_close(_logits(merged), adapted, **CLOSE)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved)
    peft_state = peft.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, peft_state[key], rtol=0, atol=1e-6, msg=key)


# The weightkit-only methods on every Conv1D (sizes that fit every layer: 8 divides 32, 96 and 128).
METHODS = {
    "bone": BoneConfig(rank=8, targets=CONV1D),
    "bat": BoneConfig(rank=8, variant="bat", targets=CONV1D),
    "mos": MoSConfig(rank=4, alpha=8, budget_rank=3, private_rank=1, shards_per_vector=2, targets=CONV1D),
    "svfit": SVFitConfig(rank=4, targets=CONV1D),
    "lora_xs": LoRASBConfig(rank=4, init="svd", targets=CONV1D),
    "lora_sb": LoRASBConfig(rank=4, init="gradient", init_lr=1e-2, targets=CONV1D),
    "increlora": IncreLoRAConfig(init_rank=2, target_total_rank=24, targets=CONV1D),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_weightkit_method_on_conv1d_computes_what_it_does_on_the_linear_twin(method):
    config = METHODS[method]
    model = _adapted(tiny_gpt2(), config)
    twin = _adapted(_as_linear(tiny_gpt2()), config)
    assert len(adapter_layers(model)) == 8
    # The initialisations (SVDs of the weight, LoRA-SB's gradient step, seeded draws) are the twin's.
    torch.testing.assert_close(_logits(model), _logits(twin), **CLOSE)
    _randomise(model)
    _randomise(twin)
    adapted = _logits(model)
    assert (adapted - _logits(tiny_gpt2())).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(adapted, _logits(twin), **CLOSE)
    merge_adapters(twin)
    torch.testing.assert_close(_logits(twin), adapted, **CLOSE)


def _conv1d_weights(model):
    return {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}


@pytest.mark.parametrize("method", [*METHODS, "said"])
def test_a_weightkit_method_on_conv1d_merges_unmerges_and_round_trips(tmp_path, method):
    config = METHODS.get(method) or SubspaceConfig(dim=64, said=True, targets=CONV1D)
    base = _conv1d_weights(tiny_gpt2())
    model = _adapted(tiny_gpt2(), config)
    _randomise(model)
    adapted = _logits(model)
    merge_adapters(model)
    torch.testing.assert_close(_logits(model), adapted, **CLOSE)
    unmerge_adapters(model)
    for module_name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, base[module_name], rtol=0, atol=1e-5)
    saved = save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(_logits(load_adapter(tiny_gpt2(), saved)), adapted, **CLOSE)
    merged = merge_and_unload(model)
    assert set(_conv1d_weights(merged)) == set(base)  # plain Conv1D layers again
    torch.testing.assert_close(_logits(merged), adapted, **CLOSE)


def test_pefts_miss_refuses_a_bone_adapter_on_conv1d_loudly(tmp_path):
    # weightkit saves Bone as PEFT's MiSS; PEFT's MiSS adapts nn.Linear only, and says so on load.
    model = adapt(tiny_gpt2(), BoneConfig(rank=8, targets=CONV1D))
    base_dir = save_tiny(tiny_gpt2(), tmp_path / "base")
    saved = save_adapter(model, tmp_path / "bone", base_model=str(base_dir))
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), saved)
