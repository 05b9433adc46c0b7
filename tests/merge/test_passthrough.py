"""Passthrough (weightkit.merge.passthrough): one model's tensors, copied or scaled."""

import pytest
import torch
from safetensors.torch import load_file

from weightkit.errors import WeightkitError
from weightkit.merge import merge
from weightkit.merge.passthrough import passthrough
from weightkit.registry import config_from_dict
from weightkit.testing import save_tiny, tiny_llama


def test_passthrough_returns_the_tensor_or_its_product_with_the_scale():
    tensor = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert passthrough(tensor) is tensor
    expected = tensor * 0.25
    assert torch.equal(passthrough(tensor.clone(), 0.25), expected)


def test_passthrough_of_one_model_copies_it_or_scales_it_per_layer(tmp_path):
    model = save_tiny(tiny_llama(seed=1, tie_word_embeddings=False), tmp_path / "m")
    config = config_from_dict("merge", {"method": "passthrough"})
    merge(None, [model], config, tmp_path / "copy", progress=False)
    original, copy = (
        load_file(model / "model.safetensors"),
        load_file(tmp_path / "copy" / "model.safetensors"),
    )
    assert copy.keys() == original.keys()
    assert all(torch.equal(copy[name], tensor) for name, tensor in original.items())
    scaled = {
        "model": model,
        "parameters": {"scale": [{"filter": "mlp", "value": [0.5, 2.0]}, {"value": 1.0}]},
    }
    merge(None, [scaled], config, tmp_path / "scaled", progress=False)
    out = load_file(tmp_path / "scaled" / "model.safetensors")
    for name, tensor in original.items():
        factor = (0.5 if ".0." in name else 2.0) if ".mlp." in name else 1.0
        torch.testing.assert_close(out[name], tensor * factor, rtol=0, atol=0, msg=name)


def test_passthrough_takes_exactly_one_model_and_no_other_base(tmp_path):
    a = save_tiny(tiny_llama(seed=1), tmp_path / "a")
    b = save_tiny(tiny_llama(seed=2), tmp_path / "b")
    config = config_from_dict("merge", {"method": "passthrough"})
    with pytest.raises(WeightkitError, match=r"passthrough merges exactly 1 model\(s\), got 2"):
        merge(None, [a, b], config, tmp_path / "out", progress=False)
    with pytest.raises(WeightkitError, match="passthrough does not use a base model"):
        merge(b, [a], config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
