"""Per-tensor parameter values: numbers, gradients over layers, filter entries (mergekit's rules)."""

import pytest

from weightkit.errors import WeightkitError
from weightkit.merge.params import check_spec, layer_index, value_for


def test_a_number_applies_to_every_tensor():
    assert value_for(0.3, "model.layers.4.mlp.up_proj.weight", 8) == 0.3


def test_a_gradient_is_interpolated_over_the_layers():
    # Five layers, values at layers 0 and 4, linear in between; outside the layers: first/last value.
    spec = [0.0, 1.0]
    got = [value_for(spec, f"model.layers.{i}.self_attn.q_proj.weight", 5) for i in range(5)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    three = [value_for([0.0, 1.0, 0.0], f"model.layers.{i}.mlp.down_proj.weight", 5) for i in range(5)]
    assert three == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert value_for(spec, "model.embed_tokens.weight", 5) == 0.0
    assert value_for(spec, "lm_head.weight", 5) == 1.0


def test_filters_pick_the_first_matching_entry():
    spec = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert value_for(spec, "model.layers.2.self_attn.v_proj.weight", 3) == 1.0
    assert value_for(spec, "model.layers.0.mlp.gate_proj.weight", 3) == 0.7
    assert value_for(spec, "model.norm.weight", 3) == 0.5
    assert value_for(spec[:2], "model.norm.weight", 3) is None


def test_layer_index_and_bad_specs():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("encoder.layer.3.attention.self.query.weight") == 3
    assert layer_index("model.norm.weight") is None
    check_spec([{"filter": "mlp", "value": [0.1, 0.2]}, {"value": 1}], "weight")
    for bad in ("high", [], [0.1, {"value": 1}], [{"filter": "mlp"}], True):
        with pytest.raises(WeightkitError, match="weight"):
            check_spec(bad, "weight")
