"""weightkit's own checkpoint format for VPTQ and GWQ layers: stored tensors, config, refusals."""

import pytest
import torch
from torch import nn

import weightkit.quantized.linear as linear_module
import weightkit.quantized.lowrank as lowrank_module
import weightkit.quantized.shared as shared_module
from weightkit.errors import WeightkitError
from weightkit.quantized.bitstack import BitStackLinear
from weightkit.quantized.codebook import VPTQWeight
from weightkit.quantized.formats import LAYER_FORMATS, quantized_model_config, stored_tensors
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.quantized.linear import OutlierQuantizedLinear, QuantizedLinear, VPTQLinear
from weightkit.quantized.outliers import SparseOutlierWeight
from weightkit.quantized.weightkit_format import (
    outlier_weight_from_stored,
    vptq_weight_from_stored,
    weightkit_format,
    weightkit_quantization_config,
)
from weightkit.testing import tiny_llama


def random_vptq(rows=16, cols=12, v=4, k=8, residual=0, seed=0) -> VPTQWeight:
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, k, (rows // v, cols), generator=g, dtype=torch.int32)
    codebook = torch.randn(k, v, generator=g).half()
    if not residual:
        return VPTQWeight(indices, codebook)
    residual_indices = torch.randint(0, residual, (rows // v, cols), generator=g, dtype=torch.int32)
    return VPTQWeight(indices, codebook, residual_indices, torch.randn(residual, v, generator=g).half())


ASYM_3BIT_G8 = QuantScheme(3, 8, False)


def outlier_weight(shape=(8, 16), positions=(3, 17, 40, 127), scheme=ASYM_3BIT_G8, seed=0):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    index = torch.tensor(positions, dtype=torch.int32)
    return SparseOutlierWeight(rtn_quantize(weight, scheme), index, weight.reshape(-1)[index.long()].half())


@pytest.mark.parametrize("k, residual", [(2, 0), (8, 0), (32, 0), (8, 4), (2, 32)])
def test_vptq_tensors_round_trip_exactly_with_log2k_bits_per_index(k, residual):
    quantized = random_vptq(rows=16, cols=12, v=4, k=k, residual=residual, seed=k)
    stored = stored_tensors(quantized, None)
    vectors = 16 // 4 * 12
    assert stored["weight"].dtype == torch.uint8 and stored["weight"].dim() == 1
    assert stored["weight"].numel() == -(-vectors * (k.bit_length() - 1) // 8)
    assert stored["weight_codebook"].dtype == torch.float16 and stored["weight_shape"].tolist() == [16, 12]
    assert ("weight_residual" in stored) == bool(residual)
    back = vptq_weight_from_stored(stored, (16, 12), "layer")
    assert torch.equal(back.indices, quantized.indices) and back.indices.dtype == torch.int32
    assert torch.equal(back.codebook, quantized.codebook)
    if residual:
        assert stored["weight_residual"].numel() == -(-vectors * (residual.bit_length() - 1) // 8)
        assert torch.equal(back.residual_indices, quantized.residual_indices)
        assert torch.equal(back.residual_codebook, quantized.residual_codebook)
    assert torch.equal(back.dequantize(), quantized.dequantize())


def test_outlier_tensors_are_the_pack_quantized_grid_plus_the_outliers():
    quantized = outlier_weight()
    bias = torch.randn(8)
    stored = stored_tensors(quantized, bias)
    grid = stored_tensors(quantized.dense, bias)  # the same layer without outliers: compressed-tensors'
    assert set(stored) == set(grid) | {"weight", "weight_outlier_index"}
    assert all(torch.equal(stored[key], grid[key]) for key in grid)
    assert torch.equal(stored["weight"], quantized.outlier_value)
    assert stored["weight_outlier_index"].tolist() == [3, 17, 40, 127]
    back = outlier_weight_from_stored(quantized.dense, stored["weight"], stored["weight_outlier_index"], "l")
    assert torch.equal(back.dequantize(), quantized.dequantize())


def test_every_quantized_layer_type_has_a_checkpoint_format():
    layers = [
        getattr(module, n)
        for module in (linear_module, lowrank_module, shared_module)
        for n in module.__all__
        if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), nn.Module)
    ]
    assert set(layers) | {BitStackLinear} == set(LAYER_FORMATS)  # BitStack's layer has a module of its own


def test_stored_tensors_refuses_a_weight_type_without_a_format():
    with pytest.raises(WeightkitError, match="Tensor has no checkpoint format"):
        stored_tensors(torch.zeros(2, 2), None)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda s: s.update(weight=s["weight"][:-1]),
            r"layer\.weight is torch\.uint8 of shape \(17,\), expected torch\.uint8 of shape \(18,\)",
        ),
        (lambda s: s.update(weight=s["weight"].to(torch.int32)), r"layer\.weight is torch\.int32"),
        (
            lambda s: s.update(weight_codebook=s["weight_codebook"][:6]),
            r"layer\.weight_codebook.*power of two",
        ),
        (
            lambda s: s.update(weight_codebook=s["weight_codebook"].float()),
            r"layer\.weight_codebook is torch\.float32",
        ),
        (
            lambda s: s.update(
                weight_codebook=s["weight_codebook"][:, :3],
                weight_residual_codebook=s["weight_residual_codebook"][:, :3],
            ),
            r"layer\.weight_codebook and weight_residual_codebook do not fit the layer \[16, 12\]: "
            r".*vector length 3 does not divide",
        ),
        (lambda s: s["weight_codebook"].__setitem__((0, 0), float("nan")), r"layer\.weight_codebook"),
        (lambda s: s.update(weight_shape=torch.tensor([12, 16])), r"layer\.weight_shape is \[12, 16\]"),
        (
            lambda s: s.update(weight_shape=torch.tensor([16, 12], dtype=torch.int32)),
            r"layer\.weight_shape is torch\.int32",
        ),
        (lambda s: s.pop("weight_codebook"), r"layer\.weight_codebook is missing"),
        (
            lambda s: s.pop("weight_residual_codebook"),
            r"layer: weight_residual and weight_residual_codebook go",
        ),
        (lambda s: s.update(weight_residual_codebook=s["weight_residual_codebook"][:, :2]), r"length 2"),
        (lambda s: s.update(weight_residual=s["weight_residual"][:-1]), r"layer\.weight_residual is"),
    ],
)
def test_vptq_reader_names_the_tensor_that_is_wrong(change, match):
    # 16 x 12, v = 4, k = 8 (3 bits x 48 indices = 18 bytes), residual k = 4 (2 bits x 48 = 12 bytes)
    stored = stored_tensors(random_vptq(k=8, residual=4), None)
    assert stored["weight"].numel() == 18 and stored["weight_residual"].numel() == 12
    change(stored)
    with pytest.raises(WeightkitError, match=match):
        vptq_weight_from_stored(stored, (16, 12), "layer")


def test_vptq_reader_refuses_a_codebook_larger_than_the_layer():
    # 2 x 2 vectors of length 4: a codebook of 8 codewords cannot come from this layer.
    stored = stored_tensors(random_vptq(rows=8, cols=2, v=4, k=8), None)
    with pytest.raises(WeightkitError, match=r"layer\.weight_codebook do not fit the layer \[8, 2\]"):
        vptq_weight_from_stored(stored, (8, 2), "layer")


@pytest.mark.parametrize(
    "index, values, match",
    [
        ([3, 17, 40, 128], None, r"l\.weight_outlier_index holds positions from 3 to 128, outside the 128"),
        ([-1, 17, 40, 127], None, "outside"),
        ([3, 40, 17, 127], None, "not strictly ascending"),
        ([3, 17, 17, 127], None, "not strictly ascending"),
        ([3, 17, 40], None, r"l\.weight_outlier_index is torch\.int32 of shape \(3,\), expected .* \(4,\)"),
        (None, torch.zeros(4), r"l\.weight is torch\.float32"),
        (None, torch.zeros(2, 2).half(), r"l\.weight is torch\.float16 of shape \(2, 2\)"),
        (None, torch.tensor([1.0, float("inf"), 0, 0]).half(), r"l\.weight"),
    ],
)
def test_outlier_reader_names_the_tensor_that_is_wrong(index, values, match):
    quantized = outlier_weight()
    index = quantized.outlier_index if index is None else torch.tensor(index, dtype=torch.int32)
    values = quantized.outlier_value if values is None else values
    with pytest.raises(WeightkitError, match=match):
        outlier_weight_from_stored(quantized.dense, values, index, "l")
    with pytest.raises(WeightkitError, match=r"l\.weight_outlier_index is torch\.int64"):
        outlier_weight_from_stored(
            quantized.dense, quantized.outlier_value, quantized.outlier_index.long(), "l"
        )


def test_outlier_reader_accepts_no_outliers():
    quantized = outlier_weight(positions=())
    back = outlier_weight_from_stored(quantized.dense, quantized.outlier_value, quantized.outlier_index, "l")
    assert torch.equal(back.dequantize(), quantized.dense.dequantize())


def test_quantization_config_blocks_and_format_recognition():
    vptq = weightkit_quantization_config("vptq", {}, ["lm_head"])
    assert vptq.keys() == {"quant_method", "format", "weightkit_version"}
    assert (vptq["quant_method"], vptq["format"]) == ("weightkit", "vptq")
    gwq = weightkit_quantization_config("gwq", {"a": QuantScheme(3, 8, True)}, ["lm_head"])
    assert gwq["ignore"] == ["lm_head"]
    (group,) = gwq["config_groups"].values()
    assert group["format"] == "pack-quantized" and group["weights"]["num_bits"] == 3
    assert weightkit_format(gwq, "cfg") == "gwq"
    with pytest.raises(WeightkitError, match="format 'aqlm'"):
        weightkit_format({**vptq, "format": "aqlm"}, "cfg")
    with pytest.raises(WeightkitError, match="not one of vptq, gwq"):
        weightkit_quantization_config("aqlm", {}, [])


def quantized_llama(kinds: dict[str, str]) -> nn.Module:
    """tiny_llama with the named layers of block 0 replaced by layers of the given kind."""
    model = tiny_llama(seed=3)
    for role, kind in kinds.items():
        name = f"model.layers.0.{role}"
        weight = model.get_submodule(name).weight.detach()
        if kind == "int":
            layer = QuantizedLinear(rtn_quantize(weight, QuantScheme(4, 8)), None)
        elif kind == "vptq":
            layer = VPTQLinear(random_vptq(*weight.shape, v=8, k=4), None)
        else:
            layer = OutlierQuantizedLinear(outlier_weight(tuple(weight.shape), (0, 5)), None)
        model.set_submodule(name, layer)
    return model


@pytest.mark.parametrize(
    "kinds, held",
    [
        (
            {"self_attn.q_proj": "vptq", "mlp.up_proj": "int"},
            r"VPTQLinear \(model\.layers\.0\.self_attn\.q_proj",
        ),
        (
            {"self_attn.q_proj": "gwq", "mlp.up_proj": "int"},
            r"QuantizedLinear \(model\.layers\.0\.mlp\.up_proj",
        ),
        (
            {"self_attn.q_proj": "vptq", "mlp.up_proj": "gwq"},
            r"OutlierQuantizedLinear \(model\.layers\.0\.mlp",
        ),
    ],
)
def test_quantized_model_config_refuses_a_mix_of_formats_by_name(kinds, held):
    with pytest.raises(WeightkitError, match=f"{held}.*one checkpoint holds one format"):
        quantized_model_config(quantized_llama(kinds))


def test_quantized_model_config_of_each_weightkit_format():
    vptq = quantized_model_config(quantized_llama({"self_attn.q_proj": "vptq", "mlp.up_proj": "vptq"}))
    assert vptq["quantization_config"]["format"] == "vptq" and vptq["model_type"] == "llama"
    gwq = quantized_model_config(quantized_llama({"self_attn.q_proj": "gwq"}))["quantization_config"]
    assert gwq["format"] == "gwq"
    assert "model.layers.0.self_attn.q_proj" not in gwq["ignore"] and "lm_head" in gwq["ignore"]


def test_writers_refuse_what_the_format_does_not_hold():
    quantized = random_vptq()
    with pytest.raises(WeightkitError, match="codebooks are stored in torch.float16, got a torch.float32"):
        stored_tensors(VPTQWeight(quantized.indices, quantized.codebook.float()), None)
    with pytest.raises(WeightkitError, match=r"outside the unsigned 3-bit range"):
        stored_tensors(VPTQWeight(quantized.indices + 8, quantized.codebook), None)  # k = 8
    outliers = outlier_weight()
    with pytest.raises(WeightkitError, match="float16/bfloat16 values at int32 positions, got torch.float32"):
        stored_tensors(SparseOutlierWeight(outliers.dense, outliers.outlier_index, torch.zeros(4)), None)


def test_a_subclass_of_a_quantized_layer_is_refused_not_stored_as_its_parent():
    class GroupedVPTQLinear(VPTQLinear):
        pass

    model = quantized_llama({"self_attn.q_proj": "vptq"})
    model.model.layers[0].self_attn.q_proj.__class__ = GroupedVPTQLinear
    with pytest.raises(
        WeightkitError, match=r"q_proj is a GroupedVPTQLinear, a subclass of a quantized layer"
    ):
        quantized_model_config(model)
