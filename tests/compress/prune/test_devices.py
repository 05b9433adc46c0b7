"""Device placement of the pruning methods: the model stays where it is, the work runs on ``device``."""

import pytest
import torch

from weightkit.compress import MagnitudeConfig, SparseGPTConfig, WandaConfig, compress
from weightkit.testing import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "the quick brown fox jumps over the lazy dog " * 4,
    "pack my box with five dozen liquor jugs " * 4,
] * 4


def _linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize(
    "config", [MagnitudeConfig(sparsity="2:4"), WandaConfig(), SparseGPTConfig(sparsity="2:4")]
)
def test_pruning_on_an_explicit_cpu_device_equals_pruning_where_the_model_is(config):
    tokenizer = tiny_tokenizer(128)
    here = compress(tiny_llama(seed=1), config, TEXTS, tokenizer=tokenizer, progress=False)
    on_cpu = compress(tiny_llama(seed=1), config, TEXTS, tokenizer=tokenizer, progress=False, device="cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    for name, weight in _linears(here).items():
        assert torch.equal(weight, _linears(on_cpu)[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparsegpt_on_cuda_leaves_the_model_on_the_cpu_and_agrees_with_the_cpu():
    tokenizer = tiny_tokenizer(128)
    config = SparseGPTConfig(sparsity="2:4")
    on_cpu = compress(tiny_llama(seed=1), config, TEXTS, tokenizer=tokenizer, progress=False)
    on_gpu = compress(tiny_llama(seed=1), config, TEXTS, tokenizer=tokenizer, progress=False, device="cuda")
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    for name, weight in _linears(on_cpu).items():
        torch.testing.assert_close(_linears(on_gpu)[name], weight, atol=1e-4, rtol=1e-4)
