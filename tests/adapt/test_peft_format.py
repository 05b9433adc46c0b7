"""PEFT's adapter format both ways for DoRA, PiSSA, per-module ranks and a trained classification head."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification

from weightkit.adapt import (
    LoRAConfig,
    adapt,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)
from weightkit.adapt.layer import adapter_layers
from weightkit.errors import WeightkitError
from weightkit.testing import save_tiny, tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])


def _randomise(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _bert_classifier():
    """A seeded 2-layer BERT with a 3-class head, the same on every call."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def _peft_model(base_dir, adapter_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()


def test_dora_matches_peft_in_both_directions(tmp_path):
    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=4, alpha=8, dora=True))
    torch.testing.assert_close(model(IDS).logits, tiny_llama(seed=0)(IDS).logits, rtol=1e-5, atol=1e-5)
    _randomise(model)  # B, A and the magnitudes
    save_adapter(model, tmp_path / "ours", base_model=str(base_dir))
    torch.testing.assert_close(_peft_model(base_dir, tmp_path / "ours")(IDS).logits, model(IDS).logits)

    peft = get_peft_model(
        tiny_llama(seed=0),
        PeftLoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    )
    _randomise(peft, seed=1)
    peft.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(seed=0), tmp_path / "peft")
    torch.testing.assert_close(ours(IDS).logits, peft(IDS).logits)


def test_dora_merge_and_unmerge_are_exact():
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=4, alpha=8, dora=True))
    _randomise(model)
    adapted = model(IDS).logits
    layers = adapter_layers(model).values()
    weights = [layer.base_layer.weight.clone() for layer in layers]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    for layer, weight in zip(layers, weights, strict=True):
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


def test_pissa_adapter_saves_against_the_original_base_model(tmp_path):
    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=4, alpha=4, init="pissa"))
    # PiSSA moves the principal part into the adapter: same outputs, different base weights.
    torch.testing.assert_close(model(IDS).logits, tiny_llama(seed=0)(IDS).logits, rtol=1e-4, atol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(
        layer.base_layer.weight, tiny_llama(seed=0).model.layers[0].self_attn.q_proj.weight
    )
    _randomise(model)
    save_adapter(model, tmp_path / "pissa", base_model=str(base_dir))
    # The saved adapter is the update against the original weights, a LoRA of twice the rank.
    torch.testing.assert_close(_peft_model(base_dir, tmp_path / "pissa")(IDS).logits, model(IDS).logits)
    reloaded = load_adapter(tiny_llama(seed=0), tmp_path / "pissa")
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_per_module_ranks_round_trip_as_rank_and_alpha_patterns(tmp_path):
    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    config = LoRAConfig(
        rank=4,
        alpha=8,
        rank_pattern={"re:.*layers\\.1\\..*": 2},
        alpha_pattern={"model.layers.0.self_attn.v_proj": 3},
    )
    model = adapt(tiny_llama(seed=0), config)
    assert model.model.layers[1].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
    _randomise(model)
    save_adapter(model, tmp_path / "ours", base_model=str(base_dir))
    torch.testing.assert_close(_peft_model(base_dir, tmp_path / "ours")(IDS).logits, model(IDS).logits)
    reloaded = load_adapter(tiny_llama(seed=0), tmp_path / "ours")
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits)


class _Blocks(torch.nn.Module):
    """Linear layers named blocks.<i>.<j>: keys such as "0" tell PEFT's suffix rule from others."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)) for _ in range(12)
        )

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_rank_and_alpha_pattern_keys_mean_what_they_mean_in_peft(tmp_path):
    # "1" is a suffix at a dot boundary (blocks.<i>.1, not blocks.1.0 nor blocks.11.0), a plain key is a
    # regex ("2\\.0" is blocks.2.0 only), and the first matching key in table order wins (blocks.1.1: 5).
    targets = [f"blocks.{i}.{j}" for i in range(12) for j in range(2)]
    settings = {"r": 2, "lora_alpha": 4, "rank_pattern": {"1": 5, "blocks.1.1": 6, "1[01]\\.0": 3},
                "alpha_pattern": {"2\\.0": 7}}  # fmt: skip
    peft_model = get_peft_model(_Blocks(), PeftLoraConfig(target_modules=targets, **settings))
    ours = adapt(_Blocks(), LoRAConfig(
        rank=2, alpha=4, targets=targets, rank_pattern=settings["rank_pattern"],
        alpha_pattern=settings["alpha_pattern"],
    ))  # fmt: skip
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()}
    for name, layer in adapter_layers(ours).items():
        peft_layer = peft_layers[name]
        assert layer.lora_A["default"].weight.shape[0] == peft_layer.r["default"], name
        assert layer.scaling["default"] == peft_layer.scaling["default"], name
    assert {n for n, m in adapter_layers(ours).items() if m.scaling["default"] == 7 / 2} == {"blocks.2.0"}
    # Saved and loaded both ways, every module keeps its rank and scaling.
    _randomise(ours)
    save_adapter(ours, tmp_path / "ours")
    x = torch.randn(3, 8)
    reread = PeftModel.from_pretrained(_Blocks(), tmp_path / "ours")
    torch.testing.assert_close(reread(x), ours(x))
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(load_adapter(_Blocks(), tmp_path / "peft")(x), peft_model(x))


def test_a_pattern_key_that_matches_no_adapted_module_is_refused():
    with pytest.raises(WeightkitError, match="rank_pattern key 'k_proj' matches none"):
        adapt(tiny_llama(seed=0), LoRAConfig(rank_pattern={"k_proj": 2}))


def test_a_classification_head_saves_as_modules_to_save(tmp_path):
    model = adapt(_bert_classifier(), LoRAConfig(rank=2))
    _randomise(model)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1)
    save_adapter(model, tmp_path / "cls", modules_to_save=["classifier"])
    peft = PeftModel.from_pretrained(_bert_classifier(), tmp_path / "cls").eval()
    torch.testing.assert_close(peft(IDS).logits, model(IDS).logits)
    torch.testing.assert_close(
        load_adapter(_bert_classifier(), tmp_path / "cls")(IDS).logits, model(IDS).logits
    )


def test_load_refuses_unknown_types_and_duplicate_names(tmp_path):
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(WeightkitError, match="already has an adapter named 'default'"):
        load_adapter(model, tmp_path / "a")
    config = (tmp_path / "a" / "adapter_config.json").read_text().replace('"LORA"', '"VERA"')
    (tmp_path / "a" / "adapter_config.json").write_text(config)
    with pytest.raises(WeightkitError, match="VERA are not supported"):
        load_adapter(tiny_llama(seed=0), tmp_path / "a")
    # A weightkit-only type with a setting this weightkit does not have is refused, not loaded without it.
    from weightkit.adapt.svfit import SVFitConfig

    save_adapter(adapt(tiny_llama(seed=0), SVFitConfig(rank=4)), tmp_path / "svfit")
    config = json.loads((tmp_path / "svfit" / "adapter_config.json").read_text())
    (tmp_path / "svfit" / "adapter_config.json").write_text(json.dumps({**config, "scale_dropout": 0.1}))
    with pytest.raises(WeightkitError, match="SVFIT adapters have no setting scale_dropout"):
        load_adapter(tiny_llama(seed=0), tmp_path / "svfit")


def test_an_eva_adapter_has_eva_ranks_and_loads_in_peft(tmp_path):
    from weightkit.adapt.eva import eva_components

    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (4, 16), generator=generator)} for _ in range(4)]
    config = LoRAConfig(rank=4, alpha=8, init="eva", eva_tau=1.0)
    model = adapt(tiny_llama(seed=0), config, data=batches)
    expected = eva_components(
        tiny_llama(seed=0), sorted(adapter_layers(model)), batches, rank=4, rho=2.0, tau=1.0
    )
    ranks = {n: layer.lora_A["default"].weight.shape[0] for n, layer in adapter_layers(model).items()}
    assert (
        ranks == {n: a.shape[0] for n, a in expected.items() if a.shape[0]} and sum(ranks.values()) <= 4 * 4
    )
    for module_name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.lora_A["default"].weight, expected[module_name])
        # Every layer keeps the scaling alpha / rank, as PEFT's EVA does.
        assert layer.scaling["default"] == pytest.approx(8 / 4)
    torch.testing.assert_close(model(IDS).logits, tiny_llama(seed=0)(IDS).logits, rtol=0, atol=0)
    _randomise(model)
    save_adapter(model, tmp_path / "eva", base_model=str(base_dir))
    torch.testing.assert_close(_peft_model(base_dir, tmp_path / "eva")(IDS).logits, model(IDS).logits)
    with pytest.raises(WeightkitError, match="needs calibration batches"):
        adapt(tiny_llama(seed=0), config)


# weightkit config and the PEFT LoraConfig fields for the same adapter.
SAME_LORA = {
    "lora": (LoRAConfig(rank=4, alpha=8), {}),
    "dora": (LoRAConfig(rank=4, alpha=8, dora=True), {"use_dora": True}),
    "pissa": (LoRAConfig(rank=4, alpha=8, init="pissa"), {"init_lora_weights": "pissa"}),
    "embedding": (
        LoRAConfig(rank=4, alpha=8, targets=["model.embed_tokens"]),
        {"target_modules": ["embed_tokens"]},
    ),
}


def _bf16_llama():
    return tiny_llama(seed=0).to(torch.bfloat16)


# Two bf16 units in the last place at these logits' scale (|logit| < 0.5): the two libraries round the
# same sums in different orders (PEFT rounds each step of a bf16 adapter's sum, weightkit fuses them).
BF16_LOGITS = {"rtol": 0, "atol": 2**-8}


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("kind", list(SAME_LORA))
def test_a_bf16_models_adapter_saves_the_dtypes_peft_saves_and_round_trips_with_peft(
    tmp_path, kind, autocast
):
    from safetensors.torch import load_file

    config, peft_fields = SAME_LORA[kind]
    ours = adapt(_bf16_llama(), config, autocast_adapter_dtype=autocast)
    _randomise(ours)
    save_adapter(ours, tmp_path / "ours")
    peft_config = PeftLoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **peft_fields}
    )
    peft = get_peft_model(_bf16_llama(), peft_config, autocast_adapter_dtype=autocast)
    _randomise(peft, seed=1)
    peft.save_pretrained(tmp_path / "peft")
    ours_saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # PEFT also saves an adapted embedding's whole table (save_embedding_layers); weightkit saves the adapter.
    peft_saved = {k: v for k, v in peft_saved.items() if not k.endswith(".base_layer.weight")}
    assert {k: v.dtype for k, v in ours_saved.items()} == {k: v.dtype for k, v in peft_saved.items()}
    assert {v.dtype for v in ours_saved.values()} == {torch.float32 if autocast else torch.bfloat16}

    loaded = PeftModel.from_pretrained(
        _bf16_llama(), tmp_path / "ours", autocast_adapter_dtype=autocast
    ).eval()
    torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, **BF16_LOGITS)
    if kind != "pissa":  # PEFT saved its PiSSA adapter against its residual base, not the original model
        mine = load_adapter(_bf16_llama(), tmp_path / "peft", autocast_adapter_dtype=autocast)
        assert {p.dtype for n, p in mine.named_parameters() if "lora" in n} == {
            torch.float32 if autocast else torch.bfloat16
        }
        torch.testing.assert_close(mine(IDS).logits, peft(IDS).logits, **BF16_LOGITS)


def test_extra_json_files_are_written_inside_the_adapter_directory_and_cannot_replace_its_own(tmp_path):
    model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a", extra_json={"labels.json": ["no", "yes"]})
    assert (tmp_path / "a" / "labels.json").read_text().strip().startswith("[")
    with pytest.raises(WeightkitError, match="cannot replace the adapter's own adapter_config.json"):
        save_adapter(model, tmp_path / "b", extra_json={"adapter_config.json": {}})
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["model", "mlp", "weight", "base_layer", "lora_A"])
def test_an_adapter_name_that_is_also_part_of_the_models_keys_is_refused(tmp_path, name):
    # PEFT accepts these; the adapter files it then writes are read back wrongly by both tools.
    config = LoRAConfig(rank=2, targets=["re:.*q_proj"])
    with pytest.raises(WeightkitError, match=f"adapter name '{name}' is also a part of the model's"):
        adapt(tiny_llama(seed=0), config, name=name)
    saved = save_adapter(adapt(tiny_llama(seed=0), config), tmp_path / "adapter")
    with pytest.raises(WeightkitError, match=f"adapter name '{name}' is also a part of the model's"):
        load_adapter(tiny_llama(seed=0), saved, name=name)
    assert load_adapter(tiny_llama(seed=0), saved, name="second") is not None


def test_a_tied_lm_head_in_modules_to_save_loads_as_a_copy_as_in_peft(tmp_path):
    # Loading the saved lm_head into the tied parameter also overwrote embed_tokens: logits ~17 apart.
    peft_model = get_peft_model(
        tiny_llama(seed=0, tie_word_embeddings=True),
        PeftLoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    )
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "modules_to_save" in param_name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    reference = PeftModel.from_pretrained(tiny_llama(seed=0, tie_word_embeddings=True), tmp_path / "adapter")
    ours = load_adapter(tiny_llama(seed=0, tie_word_embeddings=True), tmp_path / "adapter")
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    embeddings = tiny_llama(seed=0, tie_word_embeddings=True).model.embed_tokens.weight
    assert torch.equal(ours.model.embed_tokens.weight, embeddings)
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alora_invocation_tokens", [5, 9], "alora_invocation_tokens=\\[5, 9\\] are not supported"),
        ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4': PEFT re-derives the base"),
        ("init_lora_weights", "corda", "init_lora_weights='corda'"),
        ("bias", "lora", "bias='lora' is not one of PEFT's"),
        ("trainable_token_indices", [3, 4], "trainable_token_indices"),
        ("ensure_weight_tying", True, "ensure_weight_tying=True"),
        ("a_field_of_a_newer_peft", {"on": 1}, "a_field_of_a_newer_peft"),
    ],
)
def test_a_lora_config_field_weightkit_would_not_honour_is_refused_by_name(tmp_path, field, value, message):
    # aLoRA loaded as plain LoRA on every token, unconverted PiSSA on the unmodified base: silently wrong.
    import json

    saved = save_adapter(
        adapt(tiny_llama(seed=0), LoRAConfig(rank=2, targets=["re:.*q_proj"])), tmp_path / "a"
    )
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(WeightkitError, match=message):
        load_adapter(tiny_llama(seed=0), saved)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_pissa_or_olora_adapter_loads_on_the_rederived_residual_as_in_peft(tmp_path, init):
    # PEFT saves these adapters with the trained factors only and rebuilds the residual base on load;
    # weightkit put the factors on the unmodified base (logits off by ~0.1).
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    trained = get_peft_model(tiny_llama(seed=0), config)
    _randomise(trained)
    trained.save_pretrained(tmp_path)
    reference = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path).eval()
    ours = load_adapter(tiny_llama(seed=0), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    assert (ours(IDS).logits - tiny_llama(seed=0)(IDS).logits).abs().max() > 1e-2
    # Saved again by weightkit it is a plain LoRA on the original base (rank 2r), which PEFT loads alike.
    save_adapter(ours, tmp_path / "converted")
    converted = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "converted").eval()
    torch.testing.assert_close(converted(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)


def test_olora_starts_where_pefts_does():
    peft_model = get_peft_model(
        tiny_llama(seed=0),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora"),
    )
    ours = adapt(tiny_llama(seed=0), LoRAConfig(rank=4, alpha=8, targets=["re:.*q_proj"], init="olora"))
    theirs = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()}
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(IDS).logits, tiny_llama(seed=0)(IDS).logits, rtol=1e-4, atol=1e-4)


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ["q_proj"], "bias": "all"},
        {"target_modules": ["q_proj"], "bias": "lora_only"},
        {"target_modules": ["q_proj", "fc1"], "lora_bias": True},
        {
            "target_modules": ["q_proj", "v_proj"],
            "exclude_modules": ["model.decoder.layers.0.self_attn.q_proj"],
        },
        {"target_modules": "all-linear", "exclude_modules": ".*layers\\.1\\..*"},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "modules_to_save": ["decoder.layers.1.fc2"]},
    ],
    ids=lambda settings: "-".join(k for k in settings if k != "target_modules"),
)
def test_pefts_bias_exclude_and_layer_options_load_with_pefts_outputs(tmp_path, settings):
    # bias/lora_bias were refused; exclude_modules built the excluded layers, then found no tensors for them.
    reference = get_peft_model(_opt(), PeftLoraConfig(r=2, **settings)).eval()
    _randomise(reference)  # every trainable tensor: the factors, biases and saved modules
    reference.save_pretrained(tmp_path)
    ours = load_adapter(_opt(), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    assert sorted(adapter_layers(ours)) == sorted(reference.base_model.targeted_module_names)


def test_pefts_modules_to_save_names_are_suffixes(tmp_path):
    # "pooler.dense" is BERT's bert.pooler.dense: its tensors were taken for a LoRA layer's and refused.
    reference = get_peft_model(
        _bert_classifier(), PeftLoraConfig(r=2, target_modules=["query"], modules_to_save=["pooler.dense"])
    ).eval()
    _randomise(reference)
    reference.save_pretrained(tmp_path)
    ours = load_adapter(_bert_classifier(), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours.bert.pooler.dense.weight, _bert_classifier().bert.pooler.dense.weight)


def test_lora_bias_round_trips_with_peft_and_merges_into_the_base_bias(tmp_path):
    model = adapt(_opt(), LoRAConfig(rank=2, targets=["re:.*(q_proj|fc1)"], lora_bias=True))
    _randomise(model)
    save_adapter(model, tmp_path / "adapter")
    expected = model(IDS).logits
    torch.testing.assert_close(PeftModel.from_pretrained(_opt(), tmp_path / "adapter")(IDS).logits, expected)
    merge_adapters(model)
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(
        model.model.decoder.layers[0].fc1.base_layer.bias, _opt().model.decoder.layers[0].fc1.bias
    )
    with pytest.raises(WeightkitError, match="lora_bias works with plain LoRA only"):
        LoRAConfig(lora_bias=True, dora=True)
    no_bias = adapt(tiny_llama(seed=0), LoRAConfig(rank=2, lora_bias=True))
    with pytest.raises(WeightkitError, match="into a layer without a bias"):
        merge_adapters(no_bias)


def test_fields_in_their_off_state_and_dropout_load(tmp_path):
    import json

    saved = save_adapter(
        adapt(tiny_llama(seed=0), LoRAConfig(rank=2, targets=["re:.*q_proj"])), tmp_path / "a"
    )
    config = json.loads((saved / "adapter_config.json").read_text())
    off = {
        "alora_invocation_tokens": None,
        "lora_bias": False,
        "init_lora_weights": "gaussian",
        "lora_dropout": 0.1,
    }
    (saved / "adapter_config.json").write_text(json.dumps({**config, **off}))
    model = load_adapter(tiny_llama(seed=0), saved)
    assert next(iter(adapter_layers(model).values())).lora_dropout["default"].p == 0.1


def test_a_second_loaded_adapter_stays_inactive_as_in_peft(tmp_path):
    # weightkit activated every adapter it loaded (base + A1 + A2) where PEFT keeps the first one active.
    base_dir = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    dirs = []
    for seed in (1, 2):
        model = adapt(tiny_llama(seed=0), LoRAConfig(rank=2, targets=["re:.*q_proj"]))
        _randomise(model, seed)
        dirs.append(save_adapter(model, tmp_path / f"a{seed}"))
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    reference = _peft_model(base_dir, dirs[0])
    reference.load_adapter(dirs[1], adapter_name="second")
    ours = load_adapter(load_adapter(tiny_llama(seed=0), dirs[0]), dirs[1], name="second")
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    reference.set_adapter("second")
    set_active_adapters(ours, ["second"])
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_pefts_seq_cls_adapter_loads_although_it_lists_a_head_the_model_lacks(tmp_path):
    # task_type="SEQ_CLS" saves modules_to_save=["classifier", "score"]; a BERT has no "score", which PEFT
    # skips and weightkit refused.
    import json

    peft_model = get_peft_model(
        _bert_classifier(),
        PeftLoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], init_lora_weights=False),
    )
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "modules_to_save" in param_name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    peft_model.save_pretrained(tmp_path / "cls")
    assert "score" in json.loads((tmp_path / "cls" / "adapter_config.json").read_text())["modules_to_save"]
    reference = PeftModel.from_pretrained(_bert_classifier(), tmp_path / "cls").eval()
    torch.testing.assert_close(
        load_adapter(_bert_classifier(), tmp_path / "cls")(IDS).logits, reference(IDS).logits
    )


def test_a_saved_module_the_model_lacks_is_still_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    saved = save_adapter(
        adapt(tiny_llama(seed=0), LoRAConfig(rank=2)), tmp_path / "a", modules_to_save=["lm_head"]
    )
    tensors = load_file(saved / "adapter_model.safetensors")
    renamed = {key.replace(".lm_head.", ".head."): value for key, value in tensors.items()}
    save_file(renamed, saved / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["head"]}))
    with pytest.raises(WeightkitError, match="the model has no module head, which the adapter saves"):
        load_adapter(tiny_llama(seed=0), saved)
