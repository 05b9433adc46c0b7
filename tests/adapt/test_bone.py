"""Bone/Bat: the shard equations, zero init, merge/unmerge, several adapters, PEFT's MiSS format both ways."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import MissConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import weightkit
from weightkit.adapt import (
    adapter_configs,
    load_adapter,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
)
from weightkit.adapt.bone import (
    BoneConfig,
    BoneLinear,
    add_bone,
    bat_delta,
    bat_unmerge,
    bone_delta,
    bone_forward,
)
from weightkit.adapt.layer import adapter_state
from weightkit.errors import WeightkitError
from weightkit.testing import tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
PREFIX = "base_model.model."


def _randomise_blocks(model, seed=0, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "miss_block" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _bone_delta_reference(block, in_features):
    """The paper's Bone: every r-column shard of W gets D^T (a last, narrower shard its first columns)."""
    r, out_features = block.shape
    delta = torch.zeros(out_features, in_features)
    for start in range(0, in_features, r):
        width = min(r, in_features - start)
        delta[:, start : start + width] = block.T[:, :width]
    return delta


def _bat_delta_reference(weight, block):
    """The paper's Bat: block (i, j) of W becomes W_ij + W_ij @ D_i + D_i."""
    r = block.shape[-1]
    delta = torch.zeros_like(weight)
    for i in range(weight.shape[0] // r):
        for j in range(weight.shape[1] // r):
            w_ij = weight[i * r : (i + 1) * r, j * r : (j + 1) * r]
            delta[i * r : (i + 1) * r, j * r : (j + 1) * r] = w_ij @ block[i] + block[i]
    return delta


@pytest.mark.parametrize("in_features", [12, 14])  # whole shards, and a narrower last shard
def test_bone_delta_and_forward_follow_the_shard_equation(in_features):
    torch.manual_seed(0)
    block, x = torch.randn(4, 6), torch.randn(3, 5, in_features)
    expected = _bone_delta_reference(block, in_features)
    torch.testing.assert_close(bone_delta(block, in_features), expected, rtol=0, atol=0)
    torch.testing.assert_close(bone_forward(x, block), x @ expected.T, rtol=1e-5, atol=1e-5)


def test_bat_delta_follows_the_block_equation_and_unmerge_inverts_it():
    torch.manual_seed(0)
    weight, block = torch.randn(8, 12, dtype=torch.float64), 0.3 * torch.randn(2, 4, 4, dtype=torch.float64)
    delta = bat_delta(weight, block)
    torch.testing.assert_close(delta, _bat_delta_reference(weight, block), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bat_unmerge(weight + delta, block), weight, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_a_fresh_adapter_leaves_outputs_unchanged_and_only_the_blocks_train(variant):
    model = tiny_llama(seed=0)
    before = model(IDS).logits
    weightkit.adapt(model, BoneConfig(rank=8, variant=variant))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    # Both variants train r * out_features numbers per layer: q_proj 32x32 and v_proj 16x32, 2 layers.
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * (8 * 32 + 8 * 16) < total
    assert all(p.requires_grad == ("miss_block" in n) for n, p in model.named_parameters())
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    assert model(IDS, labels=IDS).loss < loss
    for name, param in model.named_parameters():
        if name in frozen:
            torch.testing.assert_close(param, frozen[name], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_merge_keeps_outputs_and_unmerge_restores_the_base_weights(variant):
    model = tiny_llama(seed=0)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    add_bone(model, BoneConfig(rank=8, variant=variant))
    _randomise_blocks(model)
    adapted = model(IDS).logits
    assert not torch.allclose(adapted, tiny_llama(seed=0)(IDS).logits, atol=1e-3)
    layers = [m for m in model.modules() if isinstance(m, BoneLinear)]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    for layer in layers:
        layer.unmerge()
    for name, param in model.named_parameters():
        if "miss_block" not in name:
            torch.testing.assert_close(param, weights[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
    torch.testing.assert_close(merge_and_unload(model)(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, BoneLinear) for m in model.modules())


def test_two_adapters_of_either_variant_compose_in_their_active_order():
    model = tiny_llama(seed=0)
    target = ["model.layers.0.self_attn.q_proj"]
    add_bone(model, BoneConfig(rank=6, targets=target), name="a")
    add_bone(model, BoneConfig(rank=8, variant="bat", targets=target), name="b")
    _randomise_blocks(model, scale=0.2)
    layer = model.model.layers[0].self_attn.q_proj
    base = layer.base_layer.weight.detach().clone()
    a, b = layer.miss_block["a"].detach(), layer.miss_block["b"].detach()
    x = torch.randn(5, 32)
    after_a = base + _bone_delta_reference(a, 32)
    a_then_b = after_a + _bat_delta_reference(after_a, b)
    torch.testing.assert_close(layer(x), F.linear(x, a_then_b), rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, a_then_b, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base, rtol=0, atol=1e-6)
    layer.active = ["b", "a"]  # Bat's update depends on the weight it meets: the order matters
    after_b = base + _bat_delta_reference(base, b)
    b_then_a = after_b + _bone_delta_reference(a, 32)
    torch.testing.assert_close(layer(x), F.linear(x, b_then_a), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a_then_b, b_then_a, atol=1e-3)
    with pytest.raises(WeightkitError, match="q_proj already has an adapter named 'a'"):
        add_bone(model, BoneConfig(rank=4, targets=target), name="a")


def test_bat_updates_differ_per_shard_where_bone_updates_are_colinear():
    # The paper's point for Bat: Bone gives every weight shard the same update (rank <= r), Bat's update
    # mixes in each shard's own weights and reaches a higher rank with the same r * out parameters.
    torch.manual_seed(0)
    weight = torch.randn(32, 32)
    bone_update = bone_delta(torch.randn(8, 32), 32)
    bat_update = bat_delta(weight, torch.randn(4, 8, 8))
    assert torch.equal(bone_update[:, :8], bone_update[:, 8:16])
    assert not torch.allclose(bat_update[:, :8], bat_update[:, 8:16])
    assert torch.linalg.matrix_rank(bone_update) <= 8 < torch.linalg.matrix_rank(bat_update)


def test_bad_configs_and_layers_are_refused():
    with pytest.raises(WeightkitError, match="rank"):
        BoneConfig(rank=0)
    with pytest.raises(WeightkitError, match="variant must be one of bone, bat"):
        BoneConfig(variant="lora")
    with pytest.raises(WeightkitError, match="'bone' variant only"):
        BoneConfig(variant="bat", dropout=0.1)
    with pytest.raises(WeightkitError, match=r"5 does not divide model.layers.0.self_attn.q_proj \(32x32\)"):
        add_bone(tiny_llama(seed=0), BoneConfig(rank=5, variant="bat"))
    with pytest.raises(WeightkitError, match="block size 40 is larger than the 32 inputs"):
        add_bone(tiny_llama(seed=0), BoneConfig(rank=40))
    with pytest.raises(WeightkitError, match="q_prj"):
        add_bone(tiny_llama(seed=0), BoneConfig(targets=["model.layers.0.self_attn.q_prj"]))
    with pytest.raises(WeightkitError, match="'LORA' is not a MiSS adapter"):
        BoneConfig.from_peft({"peft_type": "LORA", "r": 8})
    with pytest.raises(WeightkitError, match="init_weights='mini'"):
        BoneConfig.from_peft({"peft_type": "MISS", "r": 8, "init_weights": "mini", "target_modules": ["q"]})
    peft_saved = {"peft_type": "MISS", "r": 8, "target_modules": ["q_proj"], "modules_to_save": ["score"]}
    assert BoneConfig.from_peft(peft_saved).targets == ["re:(.*\\.)?q_proj"]  # PEFT's suffix match
    with pytest.raises(WeightkitError, match="layers_to_transform"):
        BoneConfig.from_peft(
            {"peft_type": "MISS", "r": 8, "layers_to_transform": [0], "target_modules": ["q"]}
        )


@pytest.mark.parametrize(("init_weights", "r"), [(True, 6), ("bat", 8)])  # bone with a narrower last shard
def test_a_peft_miss_adapter_loads_in_weightkit_with_the_same_outputs(tmp_path, init_weights, r):
    peft_model = get_peft_model(
        tiny_llama(seed=0), MissConfig(r=r, init_weights=init_weights, target_modules=["q_proj", "v_proj"])
    )
    _randomise_blocks(peft_model, seed=1)
    expected = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path)
    config = BoneConfig.from_peft(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert (config.rank, config.variant) == (r, "bat" if init_weights == "bat" else "bone")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ours = load_adapter(tiny_llama(seed=0), tmp_path)
    assert sorted(PREFIX + k for k in adapter_state(ours, "default")) == sorted(saved)  # PEFT's key names
    torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_save_adapter_and_load_adapter_round_trip_and_peft_loads_the_files(tmp_path, variant):
    model = tiny_llama(seed=0)
    config = BoneConfig(rank=8, variant=variant, dropout=0.1 if variant == "bone" else 0.0)
    add_bone(model, config)
    _randomise_blocks(model, seed=3)
    ours = model(IDS).logits  # the model is in eval mode: no dropout
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["init_weights"]) == ("MISS", True if variant == "bone" else "bat")
    loaded = load_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    assert adapter_configs(loaded)["default"] == BoneConfig(
        **{**vars(config), "targets": saved["target_modules"]}
    )
    torch.testing.assert_close(loaded(IDS).logits, ours, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter")
    torch.testing.assert_close(peft_model(IDS).logits, ours, rtol=1e-5, atol=1e-5)
