"""LowRankLinear and the "lowrank" format's tensors: forward against the dense product, stored tensors round
trip exactly, every malformed tensor refused by name; dense_weight() on the quantized layers."""

import pytest
import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.quantized.codebook import VPTQWeight
from weightkit.quantized.formats import export_tensors, quantized_model_config, stored_tensors
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.quantized.linear import QuantizedLinear, VPTQLinear
from weightkit.quantized.lowrank import LowRankLinear, LowRankWeight, lowrank_weight_from_stored


def factors(out=12, rank=3, inp=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return LowRankWeight(
        torch.randn(out, rank, generator=g).to(dtype), torch.randn(rank, inp, generator=g).to(dtype)
    )


def test_forward_equals_the_dense_product_plus_bias():
    weight = factors()
    bias = torch.randn(12, generator=torch.Generator().manual_seed(1))
    layer = LowRankLinear(weight, bias)
    x = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(2))
    dense = weight.up @ weight.down
    torch.testing.assert_close(layer(x), x @ dense.T + bias, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.dense_weight(), dense)
    assert layer.rank == 3 and (layer.out_features, layer.in_features) == (12, 20)
    assert not any(p.requires_grad for p in layer.parameters())


def test_stored_tensors_round_trip_exactly():
    weight = factors(dtype=torch.bfloat16)
    bias = torch.ones(12, dtype=torch.bfloat16)
    stored = stored_tensors(weight, bias)
    assert stored["weight"].dtype == torch.int64 and stored["weight"].tolist() == [12, 20]
    assert torch.equal(stored["bias"], bias)
    back = lowrank_weight_from_stored(stored, (12, 20), "layer")
    assert torch.equal(back.up, weight.up) and torch.equal(back.down, weight.down)


def test_export_writes_each_factored_layer_in_the_lowrank_layout():
    model = nn.Sequential(nn.Linear(20, 12), nn.Linear(12, 4))
    model[0] = LowRankLinear(factors(), model[0].bias)
    names = dict(export_tensors(model))
    assert sorted(names) == ["0.bias", "0.weight", "0.weight_down", "0.weight_up", "1.bias", "1.weight"]
    assert names["0.weight"].dim() == 1 and names["1.weight"].shape == (4, 12)
    config = quantized_model_config(model)["quantization_config"]
    assert (config["quant_method"], config["format"]) == ("weightkit", "lowrank")
    # A layer of another format beside it is refused (one format per checkpoint).
    model[1] = QuantizedLinear(rtn_quantize(torch.randn(4, 12), QuantScheme(4, None, True)), None)
    with pytest.raises(WeightkitError, match="one checkpoint holds one format"):
        quantized_model_config(model)


def good():
    weight = factors()
    return {"weight": torch.tensor([12, 20]), "weight_up": weight.up, "weight_down": weight.down}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("weight_down"), r"layer\.weight_down is missing"),
        (lambda s: s.update(weight=torch.tensor([12, 21])), r"layer\.weight is \[12, 21\]"),
        (lambda s: s.update(weight=torch.tensor([12.0, 20.0])), r"layer\.weight is torch\.float32"),
        (lambda s: s.update(weight_up=s["weight_up"][:, :2]), r"1 <= r <= 12"),
        (lambda s: s.update(weight_up=torch.zeros(12, 0), weight_down=torch.zeros(0, 20)), r"1 <= r <= 12"),
        (lambda s: s.update(weight_up=s["weight_up"].to(torch.int32)), r"layer\.weight_up is torch\.int32"),
        (lambda s: s.update(weight_down=s["weight_down"].half()), r"weight_down is torch\.float16"),
        (lambda s: s["weight_up"].__setitem__((0, 0), float("inf")), r"layer\.weight_up.*(Inf|inf)"),
    ],
)
def test_malformed_stored_tensors_are_refused_by_name(edit, message):
    stored = good()
    edit(stored)
    with pytest.raises(WeightkitError, match=message):
        lowrank_weight_from_stored(stored, (12, 20), "layer")


def test_quantized_layers_offer_their_dequantized_weight_as_dense_weight():
    quantized = rtn_quantize(torch.randn(8, 16), QuantScheme(4, 8, False))
    assert torch.equal(QuantizedLinear(quantized, None).dense_weight(), quantized.dequantize())
    g = torch.Generator().manual_seed(0)
    vptq = VPTQWeight(torch.randint(0, 4, (2, 16), generator=g, dtype=torch.int32), torch.randn(4, 4).half())
    assert torch.equal(VPTQLinear(vptq, None).dense_weight(), vptq.dequantize())
