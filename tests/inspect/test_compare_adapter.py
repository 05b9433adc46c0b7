"""Metrics of a PEFT LoRA adapter's ΔW, from its factors, against PEFT's own merged weights."""

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from weightkit.errors import WeightkitError
from weightkit.inspect.adapter import adapter_metrics, lora_core, lora_scaling, pattern_value
from weightkit.inspect.compare import compare
from weightkit.inspect.spectral import effective_rank, stable_rank
from weightkit.testing import tiny_llama


def test_the_core_has_the_singular_values_of_the_scaled_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 20, generator=g), torch.randn(30, 3, generator=g)
    expected = torch.linalg.svdvals(2.5 * (b @ a).double())[:3]
    torch.testing.assert_close(torch.linalg.svdvals(lora_core(a, b, 2.5)), expected)


def test_scaling_and_pattern_matching_follow_peft():
    assert lora_scaling(16, 4, use_rslora=False) == 4.0 and lora_scaling(16, 4, use_rslora=True) == 8.0
    assert pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8) == 2
    assert pattern_value({"v_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 8
    assert pattern_value({"layers.1.*q_proj": 2}, "model.layers.1.self_attn.q_proj", 8) == 2
    assert pattern_value({"proj": 2}, "model.layers.0.self_attn.v_proj", 8) == 8  # a suffix after a dot only


def _adapter(tmp_path, **config):
    """A real PEFT adapter on tiny Llama with random (nonzero) factors; returns it and ΔW by merging."""
    model = tiny_llama()
    base = {name: t.clone() for name, t in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    deltas = {name: merged[name] - base[name] for name in base if not torch.equal(merged[name], base[name])}
    return tmp_path / "adapter", deltas


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_metrics_match_peft_merge_and_unload(tmp_path, use_rslora):
    adapter, deltas = _adapter(
        tmp_path,
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    table = adapter_metrics(adapter)
    rows = {row["name"]: row for row in table.rows}
    assert set(rows) == set(deltas) and len(rows) == 4  # q_proj and v_proj of both layers
    for name, delta in deltas.items():
        row = rows[name]
        rank, alpha = (2, 3) if "v_proj" in name else (4, 8)
        assert (row["rank"], row["alpha"]) == (rank, alpha)
        assert row["scaling"] == pytest.approx(alpha / (math.sqrt(rank) if use_rslora else rank))
        values = torch.linalg.svdvals(delta.double())
        # float32 merge in PEFT: agreement to its rounding.
        assert row["singular_values"] == pytest.approx(values[:rank].tolist(), rel=1e-4)
        assert row["frobenius_norm"] == pytest.approx(float(delta.double().norm()), rel=1e-4)
        assert row["spectral_norm"] == pytest.approx(float(values[0]), rel=1e-4)
        assert row["stable_rank"] == pytest.approx(stable_rank(delta), rel=1e-3)
        assert row["effective_rank"] == pytest.approx(effective_rank(delta), rel=1e-3)
        assert row["shape"] == list(delta.shape)
    assert table.summary["total_rank"] == 12
    assert list(compare("unused-base", [adapter])) == [f"adapter:{adapter}"]


def test_an_untrained_adapter_has_zero_change(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    peft_model.save_pretrained(tmp_path / "adapter")
    rows = adapter_metrics(tmp_path / "adapter").rows
    assert all(row["status"] == "zero" and row["frobenius_norm"] == 0 for row in rows)
    assert all(row["effective_rank"] is None for row in rows)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("use_dora", True, "use_dora"),
        ("fan_in_fan_out", True, "fan_in_fan_out"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "all", "bias"),
        ("peft_type", "IA3", "peft_type 'IA3'"),
        ("init_lora_weights", "pissa", "rewrites the base weights"),
        ("some_future_option", 1, "some_future_option"),
    ],
)
def test_unsupported_adapter_options_are_refused_by_name(tmp_path, field, value, message):
    adapter, _ = _adapter(tmp_path, r=2)
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(WeightkitError, match=message):
        adapter_metrics(adapter)


def test_lora_on_an_embedding_is_refused_naming_a_tensor_it_cannot_read(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], r=2))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(WeightkitError, match="embed_tokens.* not a LoRA factor of a linear layer"):
        adapter_metrics(tmp_path / "adapter")
