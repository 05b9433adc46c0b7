"""LoRA core: zero-initialised adapters, merge/unmerge, several adapters, PEFT's format both ways."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from weightkit.adapt import (
    LoRAConfig,
    LoRALinear,
    adapter_summary,
    add_lora,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    set_active_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from weightkit.adapt.lora import LoRAConv2d, LoRAEmbedding
from weightkit.errors import WeightkitError
from weightkit.testing import save_tiny, tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])


def _randomise_b(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                for linear in module.lora_B.values():
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.1)


def test_a_fresh_adapter_leaves_outputs_unchanged_and_trains_only_lora():
    model = tiny_llama(seed=0)
    before = model(IDS).logits
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    trainable, total = trainable_parameters(model)
    # q_proj (32x32) and v_proj (16x32 with 2 KV heads) in 2 layers, rank 4: A is 4x32, B is out x 4.
    assert trainable == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    assert total > trainable


def test_merge_then_unmerge_restores_the_base_weights_and_merge_keeps_outputs():
    model = tiny_llama(seed=0)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    add_lora(model, LoRAConfig(rank=4, alpha=8, rslora=True))
    _randomise_b(model)
    adapted = model(IDS).logits
    merge_adapters(model)
    merge_adapters(model)  # idempotent
    assert all(layer.merged == ["default"] for layer in model.modules() if isinstance(layer, LoRALinear))
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)  # the adapter runs again
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            torch.testing.assert_close(param, weights[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_two_named_adapters_add_up():
    model = tiny_llama(seed=0)
    add_lora(model, LoRAConfig(rank=2, targets=["model.layers.0.self_attn.q_proj"]), name="a")
    add_lora(model, LoRAConfig(rank=3, targets=["model.layers.0.self_attn.q_proj"]), name="b")
    _randomise_b(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32)
    expected = layer.base_layer(x) + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightkitError, match="already has an adapter named 'a'"):
        add_lora(model, LoRAConfig(rank=2, targets=["model.layers.0.self_attn.q_proj"]), name="a")


@pytest.mark.parametrize("layer_type", ["linear", "embedding", "conv"])
def test_lora_and_dora_on_one_layer_merge_to_the_outputs_they_give_unmerged(layer_type):
    # A DoRA adapter's norm is taken against the base weight (PEFT's forward); merging the adapters one
    # after the other normalised it against a weight the LoRA one had already changed (outputs moved by ~5).
    torch.manual_seed(0)
    base, layer_cls, x = {
        "linear": (torch.nn.Linear(16, 12), LoRALinear, torch.randn(5, 16)),
        "embedding": (torch.nn.Embedding(20, 12), LoRAEmbedding, torch.tensor([[1, 4, 19, 7]])),
        "conv": (torch.nn.Conv2d(3, 6, 3, padding=1), LoRAConv2d, torch.randn(2, 3, 8, 8)),
    }[layer_type]
    layer = layer_cls(base)
    layer.add_adapter("plain", rank=2, scaling=2.0)
    layer.add_adapter("dora", rank=3, scaling=0.5, dora=True)
    layer.add_adapter("dora2", rank=2, scaling=1.0, dora=True)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer."):
                param.add_(torch.randn_like(param) * 0.3)
    weight = base.weight.clone()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=1e-5, atol=1e-5)
    # Merged in two steps (one adapter, then all three), the result is the same.
    layer.active = ["dora"]
    layer.merge()
    layer.active = ["plain", "dora", "dora2"]
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_lora_and_dora_active_together_give_pefts_outputs(tmp_path):
    peft_model = get_peft_model(
        tiny_llama(seed=0), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter_name="a"
    )
    peft_model.add_adapter("b", PeftLoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"], use_dora=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.base_model.set_adapter(["a", "b"])
    peft_model.save_pretrained(tmp_path)  # in tmp_path / "a" and tmp_path / "b"
    ours = load_adapter(tiny_llama(seed=0), tmp_path / "a", name="a")
    load_adapter(ours, tmp_path / "b", name="b")
    set_active_adapters(ours, ["a", "b"])
    expected = peft_model(IDS).logits
    torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    merge_adapters(ours)
    torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(32,), (5, 32), (2, 3, 32)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float64])
def test_the_forward_is_the_base_plus_the_scaled_update_for_any_input_shape_and_adapter_dtype(
    shape, adapter_dtype
):
    # Batched inputs take the fused addmm path, unbatched ones the plain one. Both compute W x + s B A x,
    # with gradients; an adapter in a wider dtype (PEFT's fp32 adapters on a bf16 base) sums in its dtype and
    # the result is rounded to the base output's dtype once, as PEFT's forward does.
    layer = LoRALinear(torch.nn.Linear(32, 16))
    layer.add_adapter("default", rank=4, scaling=0.7)
    layer.lora_A.to(adapter_dtype)
    layer.lora_B.to(adapter_dtype)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (layer.base_layer(x) + 0.7 * x.to(adapter_dtype) @ a.T @ b.T).float()
    assert out.dtype == torch.float32 and out.shape == (*shape[:-1], 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, b])
    torch.testing.assert_close(grads, torch.autograd.grad(expected.square().sum(), [x, b]))


def test_bad_configs_and_targets_are_refused():
    with pytest.raises(WeightkitError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(WeightkitError, match="rank"):
        add_lora(tiny_llama(seed=0), LoRAConfig(rank=20, init="pissa", targets=["re:.*v_proj"]))
    with pytest.raises(WeightkitError, match="q_prj"):
        add_lora(tiny_llama(seed=0), LoRAConfig(targets=["model.layers.0.self_attn.q_prj"]))


def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    model = tiny_llama(seed=0)
    add_lora(model, LoRAConfig(rank=4, alpha=16))
    _randomise_b(model, seed=1)
    ours = model(IDS).logits
    save_adapter(model, tmp_path / "adapter", base_model=str(base_dir))
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter"
    )
    torch.testing.assert_close(peft_model(IDS).logits, ours, rtol=1e-5, atol=1e-5)


def test_a_peft_adapter_loads_in_weightkit_with_the_same_outputs(tmp_path):
    peft_model = get_peft_model(
        tiny_llama(seed=0), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    expected = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    ours = load_adapter(tiny_llama(seed=0), tmp_path / "peft-adapter")
    torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(WeightkitError, match="another model"):
        load_adapter(tiny_llama(seed=0, hidden_size=64, intermediate_size=64), tmp_path / "peft-adapter")


def test_adapt_picks_lora_from_its_config_and_adapters_can_be_switched():
    import weightkit

    model = tiny_llama(seed=0)
    base = model(IDS).logits
    weightkit.adapt(model, LoRAConfig(rank=2), name="a")
    weightkit.adapt(model, LoRAConfig(rank=2), name="b")
    _randomise_b(model)
    both = model(IDS).logits
    set_active_adapters(model, ["a"])
    only_a = model(IDS).logits
    set_active_adapters(model, [])
    torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)
    set_active_adapters(model, ["a", "b"])
    torch.testing.assert_close(model(IDS).logits, both)
    assert not torch.allclose(only_a, both) and not torch.allclose(only_a, base)
    with pytest.raises(WeightkitError, match="no adapter named c"):
        set_active_adapters(model, ["c"])


def test_adapter_summary_counts_each_adapters_own_parameters():
    import weightkit
    from weightkit.adapt import MoSConfig

    model = tiny_llama(seed=0)
    weightkit.adapt(model, LoRAConfig(rank=2, targets=["model.layers.0.self_attn.q_proj"]), name="a")
    weightkit.adapt(model, LoRAConfig(rank=3, dora=True), name="b")
    set_active_adapters(model, ["b"])
    merge_adapters(model)
    rows = {row["adapter"]: row for row in adapter_summary(model)}
    # q_proj is 32x32 and v_proj 16x32 (grouped KV heads); DoRA adds one magnitude per output row.
    assert rows["a"] == {"adapter": "a", "method": "lora", "layers": 1, "parameters": 128, "trainable": 128,
                         "active": False, "merged": False}  # fmt: skip
    b_params = 2 * (3 * 64 + 32) + 2 * (3 * 48 + 16)
    assert rows["b"] == {"adapter": "b", "method": "dora", "layers": 4, "parameters": b_params,
                         "trainable": b_params, "active": True, "merged": True}  # fmt: skip
    assert rows["a"]["trainable"] + rows["b"]["trainable"] == trainable_parameters(model)[0]
    # Pools shared by several layers count once.
    mos = tiny_llama(seed=0)
    weightkit.adapt(mos, MoSConfig(rank=4, budget_rank=2, private_rank=0))
    (row,) = adapter_summary(mos)
    assert row["method"] == "mos" and row["parameters"] == trainable_parameters(mos)[0]


def test_load_applies_an_adapter_to_the_base_model(tmp_path):
    import weightkit

    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    model = tiny_llama(seed=0)
    add_lora(model, LoRAConfig(rank=4))
    _randomise_b(model, seed=2)
    save_adapter(model, tmp_path / "adapter")
    loaded = weightkit.load(base_dir, adapter=tmp_path / "adapter")
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
