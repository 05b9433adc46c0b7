"""VPTQLinear and OutlierQuantizedLinear compute with exactly the weight their stored form dequantizes to,
keep their format's 16-bit tensors through dtype casts, and are what quantized_layer picks."""

import pytest
import torch
from torch import nn

from weightkit.quantized.codebook import VPTQWeight
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.quantized.linear import OutlierQuantizedLinear, QuantizedLinear, VPTQLinear, quantized_layer
from weightkit.quantized.outliers import SparseOutlierWeight


def vptq_weight(out=8, cols=6, v=4, k=4, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, k, (out // v, cols), generator=g, dtype=torch.int32)
    codebook = torch.randn(k, v, generator=g).half()
    if not residual:
        return VPTQWeight(indices, codebook)
    r_indices = torch.randint(0, 2, (out // v, cols), generator=g, dtype=torch.int32)
    return VPTQWeight(indices, codebook, r_indices, torch.randn(2, v, generator=g).half())


def test_vptq_linear_uses_the_codewords_element_by_element():
    q = vptq_weight()
    layer = quantized_layer(q, torch.arange(8.0))
    assert isinstance(layer, VPTQLinear) and (layer.out_features, layer.in_features) == (8, 6)
    # Element [r * v + i, j] is codebook[indices[r, j], i] + residual_codebook[residual_indices[r, j], i].
    expected = torch.empty(8, 6)
    for r in range(2):
        for i in range(4):
            for j in range(6):
                expected[r * 4 + i, j] = float(q.codebook[q.indices[r, j], i]) + float(
                    q.residual_codebook[q.residual_indices[r, j], i]
                )
    assert torch.equal(layer.dequantized_weight(), expected)
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), x @ expected.T + torch.arange(8.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_16_bit_tensors_of_the_formats_survive_dtype_casts(dtype):
    # bfloat16 would round float16 codebook entries and outliers, were they floating-point buffers.
    layer = VPTQLinear(vptq_weight(residual=True), None)
    codebook, residual = layer.quantized.codebook.clone(), layer.quantized.residual_codebook.clone()
    layer.to(dtype)
    assert torch.equal(layer.quantized.codebook, codebook) and layer.quantized.codebook.dtype == torch.float16
    assert torch.equal(layer.quantized.residual_codebook, residual)
    value = torch.tensor([1.0009765625, -3.3], dtype=torch.float16)  # 1 + 2^-10 is not a bfloat16
    dense = rtn_quantize(torch.randn(2, 4), QuantScheme(4, None))
    outliers = OutlierQuantizedLinear(
        SparseOutlierWeight(dense, torch.tensor([0, 5], dtype=torch.int32), value), None
    )
    outliers.to(dtype)
    assert torch.equal(outliers.quantized.outlier_value, value)
    assert "v=4 k=4 + residual k=2" in repr(layer)


def test_outlier_layer_restores_outliers_over_the_grid():
    w = torch.randn(4, 8)
    dense = rtn_quantize(w, QuantScheme(3, 4))
    index = torch.tensor([1, 17, 30], dtype=torch.int32)
    value = torch.tensor([9.0, -7.5, 3.25], dtype=torch.float16)
    layer = quantized_layer(SparseOutlierWeight(dense, index, value), None)
    assert isinstance(layer, OutlierQuantizedLinear)
    # Not a QuantizedLinear: code reading that class's grid alone would miss the outliers.
    assert not isinstance(layer, QuantizedLinear)
    weight = layer.dequantized_weight()
    expected = dense.dequantize().reshape(-1).clone()
    expected[index.long()] = value.float()
    assert torch.equal(weight.reshape(-1), expected)
    x = torch.randn(2, 8)
    assert torch.allclose(layer(x), x @ weight.T)
    assert "3 outliers" in repr(layer)


@pytest.mark.parametrize("weight", [vptq_weight(), rtn_quantize(torch.randn(4, 8), QuantScheme(4, None))])
def test_quantized_layer_keeps_the_linear_bias(weight):
    bias = torch.randn(weight.indices.shape[0] * 4 if isinstance(weight, VPTQWeight) else 4)
    layer = quantized_layer(weight, nn.Parameter(bias))
    assert torch.equal(layer.bias, bias) and not layer.bias.requires_grad
