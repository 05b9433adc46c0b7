"""Per-tensor parameter values: numbers, gradients over layers, filter entries (mergekit's rules)."""

import pytest

from weightkit.errors import WeightkitError
from weightkit.merge.params import check_spec, layer_index, value_for


def test_a_number_applies_to_every_tensor():
    assert value_for(0.3, "model.layers.4.mlp.up_proj.weight", 8) == 0.3


def test_a_gradient_is_interpolated_over_the_layers():
    # Five layers, values at layers 0 and 4, linear in between; outside the layers: the first value.
    spec = [0.0, 1.0]
    got = [value_for(spec, f"model.layers.{i}.self_attn.q_proj.weight", 5) for i in range(5)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    three = [value_for([0.0, 1.0, 0.0], f"model.layers.{i}.mlp.down_proj.weight", 5) for i in range(5)]
    assert three == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert value_for(spec, "model.embed_tokens.weight", 5) == 0.0


def test_tensors_outside_the_layers_take_the_first_value_as_in_mergekit():
    # mergekit plans embeddings, the final norm and lm_head with t = 0 (weightkit gave the last two the
    # gradient's last value: 0.03-0.11 apart on tiny models).
    for name in (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert value_for([0.1, 0.9], name, 4) == 0.1, name
    # One layer sits at t = 1 (mergekit: "t = 1" when a slice has one layer).
    assert value_for([0.1, 0.9], "model.layers.0.mlp.up_proj.weight", 1) == 0.9


def test_the_gradient_is_mergekits_float_for_float():
    def mergekit(values, t):  # mergekit.config.evaluate_setting's numeric branch
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]

    values = [0.3, 0.7, 0.11, 0.9]
    for i in range(7):
        assert value_for(values, f"model.layers.{i}.mlp.up_proj.weight", 7) == mergekit(values, i / 6)


def test_filters_pick_the_first_matching_entry():
    spec = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert value_for(spec, "model.layers.2.self_attn.v_proj.weight", 3) == 1.0
    assert value_for(spec, "model.layers.0.mlp.gate_proj.weight", 3) == 0.7
    assert value_for(spec, "model.norm.weight", 3) == 0.5
    assert value_for(spec[:2], "model.norm.weight", 3) is None


@pytest.mark.parametrize("match_all", [{"filter": "*"}, {"filter": None}, {}])
def test_a_wildcard_or_empty_filter_matches_every_tensor(match_all):
    # mergekit's "*" wildcard matched nothing here, and the value silently fell back to the default.
    spec = [{"filter": "self_attn", "value": 0.2}, {**match_all, "value": 0.6}]
    assert value_for(spec, "model.layers.0.mlp.up_proj.weight", 2) == 0.6
    assert value_for(spec, "lm_head.weight", 2) == 0.6


def test_layer_index_and_bad_specs():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("encoder.layer.3.attention.self.query.weight") == 3
    assert layer_index("model.norm.weight") is None
    check_spec([{"filter": "mlp", "value": [0.1, 0.2]}, {"value": 1}], "weight")
    for bad in ("high", [], [0.1, {"value": 1}], [{"filter": "mlp"}], True):
        with pytest.raises(WeightkitError, match="weight"):
            check_spec(bad, "weight")
