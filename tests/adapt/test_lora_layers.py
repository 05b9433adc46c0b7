"""LoRA (and DoRA) on nn.Embedding and nn.Conv2d: the math, merging, and PEFT's format both ways."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from weightkit.adapt import LoRAConfig, add_lora, load_adapter, merge_and_unload, save_adapter
from weightkit.adapt.layer import adapter_layers
from weightkit.adapt.lora import LoRAConv2d, LoRAEmbedding
from weightkit.errors import WeightkitError
from weightkit.testing import save_tiny, tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 0]])
CONV_TARGETS = ["0", "2", "4"]


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip


def _images(seed=0):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _randomise(model, seed=0):
    """Move every trainable tensor (the adapters' A, B and magnitudes) off its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def test_embedding_lora_starts_neutral_and_adds_the_low_rank_rows():
    model = nn.Sequential(nn.Embedding(20, 6, padding_idx=0))
    table = model[0].weight.clone()
    ids = torch.tensor([[3, 0, 7, 3, 19]])
    add_lora(model, LoRAConfig(rank=3, alpha=6, targets=["0"]))
    layer = model[0]
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    # PEFT's embedding init is the reverse of the linear one: A zero, B standard normal.
    assert a.shape == (3, 20) and b.shape == (6, 3) and not a.any() and b.std() > 0.3
    torch.testing.assert_close(model(ids), F.embedding(ids, table), rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_embedding_A.default",
        "0.lora_embedding_B.default",
    }
    _randomise(model)
    # Reference, one token at a time: row t of the table plus scaling * B @ A[:, t].
    expected = torch.stack([table[t] + 2.0 * b @ a[:, t] for t in ids[0]])[None]
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)
    delta = torch.stack([2.0 * b @ a[:, t] for t in range(20)])
    torch.testing.assert_close(layer.delta_weight("default"), delta, rtol=1e-5, atol=1e-6)


class _ScaledEmbedding(nn.Embedding):
    """Like Gemma's: the looked-up rows are multiplied by ``embed_scale``."""

    def __init__(self, *args, embed_scale: float):
        super().__init__(*args)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


@pytest.mark.parametrize("dora", [False, True])
def test_a_scaled_embedding_scales_the_update_as_merging_does(dora):
    model = add_lora(
        nn.Sequential(_ScaledEmbedding(20, 6, embed_scale=3.0)), LoRAConfig(rank=2, targets=["0"], dora=dora)
    )
    _randomise(model)
    ids = torch.tensor([[3, 1, 7, 19]])
    adapted = model(ids)
    model[0].merge()
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)


def test_conv_lora_starts_neutral_and_is_one_convolution_with_the_composed_kernel():
    model = _conv_net()
    x = _images()
    base = model(x)
    add_lora(model, LoRAConfig(rank=2, alpha=4, targets=CONV_TARGETS))
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    layer = model[2]
    assert isinstance(layer, LoRAConv2d)
    assert (layer.lora_A["default"].kernel_size, layer.lora_A["default"].stride) == ((3, 3), (2, 2))
    assert layer.lora_B["default"].kernel_size == (1, 1)
    _randomise(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (2, 8, 3, 3), (8, 2, 1, 1)
    # Reference: output channel o's kernel gains scaling * sum_j B[o, j] A[j], written as loops.
    delta = torch.zeros_like(layer.base_layer.weight)
    for o in range(8):
        for j in range(2):
            delta[o] += 2.0 * b[o, j, 0, 0] * a[j]
    torch.testing.assert_close(layer.delta_weight("default"), delta, rtol=1e-5, atol=1e-6)
    h = torch.randn(2, 8, 8, 8)
    base_layer = layer.base_layer
    expected = F.conv2d(h, base_layer.weight + delta, base_layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(h), expected, rtol=1e-5, atol=1e-5)


def test_dora_on_embedding_and_conv_follows_the_papers_weight():
    # DoRA: W' = m * (W + delta) / ||W + delta|| per output feature, m starting at the norms (neutral).
    emb = nn.Sequential(nn.Embedding(20, 6))
    table = emb[0].weight.clone()
    ids = torch.tensor([[3, 1, 7, 19]])
    add_lora(emb, LoRAConfig(rank=2, alpha=2, targets=["0"], dora=True))
    torch.testing.assert_close(emb(ids), F.embedding(ids, table), rtol=1e-6, atol=1e-6)
    _randomise(emb)
    layer = emb[0]
    # An embedding's output features are the table's columns (the map from one-hot tokens is the table^T).
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    updated = table + (b @ a).T
    expected_table = layer.lora_magnitude_vector["default"] * updated / updated.norm(dim=0)
    torch.testing.assert_close(emb(ids), F.embedding(ids, expected_table), rtol=1e-5, atol=1e-5)

    conv = _conv_net()
    x = _images()
    base = conv(x)
    add_lora(conv, LoRAConfig(rank=2, alpha=2, targets=["2"], dora=True))
    torch.testing.assert_close(conv(x), base, rtol=1e-5, atol=1e-6)
    _randomise(conv)
    layer = conv[2]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    updated = layer.base_layer.weight + torch.einsum("oj,jikl->oikl", b[:, :, 0, 0], a)
    magnitude = layer.lora_magnitude_vector["default"]  # PEFT's shape (1, out, 1, 1)
    assert magnitude.shape == (1, 8, 1, 1)
    kernel = (
        magnitude.reshape(8, 1, 1, 1)
        * updated
        / torch.linalg.vector_norm(updated, dim=(1, 2, 3), keepdim=True)
    )
    h = torch.randn(2, 8, 8, 8)
    expected = F.conv2d(h, kernel, layer.base_layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(h), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_then_unmerge_restores_embedding_and_conv_weights(dora):
    llama = tiny_llama(seed=0)
    add_lora(llama, LoRAConfig(rank=4, alpha=8, targets=["model.embed_tokens", "re:.*q_proj"], dora=dora))
    conv = add_lora(_conv_net(), LoRAConfig(rank=2, alpha=4, targets=CONV_TARGETS, dora=dora))
    x = _images()
    for model, run in [(llama, lambda m: m(IDS).logits), (conv, lambda m: m(x))]:
        _randomise(model)
        adapted = run(model)
        layers = list(adapter_layers(model).values())
        weights = [layer.base_layer.weight.clone() for layer in layers]
        for layer in layers:
            layer.merge()
        torch.testing.assert_close(run(model), adapted, rtol=1e-5, atol=1e-5)
        for layer, weight in zip(layers, weights, strict=True):
            layer.unmerge()
            torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-5)
        merged = merge_and_unload(model)
        assert not adapter_layers(merged)
        torch.testing.assert_close(run(merged), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_embedding_lora_matches_peft_in_both_directions(tmp_path, dora):
    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    config = LoRAConfig(
        rank=4, alpha=8, targets=["model.embed_tokens", "re:.*q_proj"], dora=dora,
        rank_pattern={"model.embed_tokens": 2},
    )  # fmt: skip
    model = add_lora(tiny_llama(seed=0), config)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)
    _randomise(model)
    save_adapter(model, tmp_path / "ours", base_model=str(base_dir))
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 128)
    assert saved["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 2)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ours").eval()
    torch.testing.assert_close(peft(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)

    peft = get_peft_model(
        tiny_llama(seed=0),
        PeftLoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=["embed_tokens", "q_proj"]),
    )
    _randomise(peft, seed=1)
    with torch.no_grad():  # PEFT also saves the whole embedding table; loading must take it, as PEFT does
        peft.base_model.model.model.embed_tokens.base_layer.weight[5] += 1.0
    peft.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(seed=0), tmp_path / "peft")
    torch.testing.assert_close(ours(IDS).logits, peft(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_conv_lora_matches_peft_in_both_directions_with_the_same_keys(tmp_path, dora):
    x = _images()
    model = add_lora(_conv_net(), LoRAConfig(rank=2, alpha=4, targets=CONV_TARGETS, dora=dora))
    _randomise(model)
    save_adapter(model, tmp_path / "ours")
    peft = PeftModel.from_pretrained(_conv_net(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft(x), model(x), rtol=1e-5, atol=1e-5)

    peft = get_peft_model(
        _conv_net(), PeftLoraConfig(r=2, lora_alpha=4, use_dora=dora, target_modules=CONV_TARGETS)
    )
    _randomise(peft, seed=1)
    peft.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    loaded = load_adapter(_conv_net(), tmp_path / "peft")
    torch.testing.assert_close(loaded(x), peft(x), rtol=1e-5, atol=1e-5)


def test_a_second_adapter_with_a_broad_pattern_reuses_the_layers():
    model = add_lora(_conv_net(), LoRAConfig(rank=2, targets=["re:.*"]), name="a")
    add_lora(model, LoRAConfig(rank=2, targets=["re:.*"]), name="b")
    layers = adapter_layers(model)
    assert list(layers) == CONV_TARGETS
    assert all(layer.adapter_names() == ["a", "b"] for layer in layers.values())


def test_layers_lora_cannot_adapt_exactly_are_refused():
    cases = [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, dilation=2), "dilation"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Embedding(10, 4, max_norm=1.0), "max_norm"),
    ]
    for module, message in cases:
        with pytest.raises(WeightkitError, match=message):
            add_lora(nn.Sequential(module), LoRAConfig(rank=2, targets=["0"]))
    with pytest.raises(WeightkitError, match="init='pissa' works on nn.Linear and Conv1D .*Embedding"):
        add_lora(tiny_llama(seed=0), LoRAConfig(init="pissa", targets=["model.embed_tokens", "re:.*q_proj"]))
    batches = [{"input_ids": IDS}]
    with pytest.raises(WeightkitError, match="init='eva' works on nn.Linear and Conv1D layers only"):
        add_lora(tiny_llama(seed=0), LoRAConfig(init="eva", targets=["model.embed_tokens"]), data=batches)
