"""Model-level RTN: every selected linear rounded on its own, where asked."""

import pytest
import torch

from weightkit.compress import RTNConfig, compress
from weightkit.compress.quant import rtn
from weightkit.quantized.grid import rtn_quantize
from weightkit.quantized.linear import QuantizedLinear
from weightkit.testing import tiny_llama


def test_rtn_rounds_each_weight_on_the_device_and_leaves_the_model_where_it_is(monkeypatch):
    model = tiny_llama(seed=0)
    placements = []

    def record(w, scheme, **kwargs):
        placements.append(w.device.type)
        return rtn_quantize(torch.zeros(w.shape), scheme, **kwargs)  # meta holds no values to round

    monkeypatch.setattr(rtn, "rtn_quantize", record)
    compress(model, RTNConfig(bits=4, group_size=16), progress=False, device="meta")
    assert placements == ["meta"] * 14
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and {t.device.type for t in model.state_dict().values()} == {"cpu"}


def test_rtn_without_a_device_runs_where_the_weights_are():
    model = tiny_llama(seed=0)
    expected = rtn_quantize(
        model.model.layers[0].mlp.up_proj.weight.detach(), RTNConfig(group_size=16).scheme_for("x")
    )
    compress(model, RTNConfig(group_size=16), progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.qweight, expected.qweight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rtn_on_a_gpu_equals_rtn_on_the_cpu():
    on_cpu = compress(tiny_llama(seed=0), RTNConfig(group_size=16), progress=False)
    on_gpu = compress(tiny_llama(seed=0), RTNConfig(group_size=16), progress=False, device="cuda")
    for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values(), strict=True):
        assert b.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
