"""What every adapter method shares: adapter precision (float32 adapters on 16-bit layers, PEFT's default)."""

import copy

import pytest
import torch

from weightkit.adapt import (
    BoneConfig,
    IncreLoRAConfig,
    LoRAConfig,
    LoRASBConfig,
    MoSConfig,
    SubspaceConfig,
    SVFitConfig,
    adapt,
)
from weightkit.adapt.layer import adapter_dtype, adapter_state
from weightkit.testing import tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7]])


def _batches(n=2):
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (4, 12), generator=generator) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


# One config per method and variant; LoRA-SB's init_lr is the run's first-step learning rate.
METHODS = {
    "lora": LoRAConfig(rank=4),
    "dora": LoRAConfig(rank=4, dora=True),
    "pissa": LoRAConfig(rank=4, init="pissa"),
    "eva": LoRAConfig(rank=4, init="eva", eva_tau=0.5),
    "lora_sb": LoRASBConfig(rank=4, init_lr=1e-3),
    "lora_xs": LoRASBConfig(rank=4, init="svd"),
    "svfit": SVFitConfig(rank=4),
    "bone": BoneConfig(rank=4),
    "bat": BoneConfig(rank=4, variant="bat"),
    "mos": MoSConfig(rank=4, budget_rank=3, private_rank=1),
    "increlora": IncreLoRAConfig(init_rank=2),
    "did": SubspaceConfig(dim=50, targets=["re:.*_proj"]),
    "said": SubspaceConfig(dim=50, said=True, targets=["re:.*_proj"]),
}


def test_adapter_dtype_upcasts_16_and_8_bit_floats_only_and_only_when_asked():
    assert adapter_dtype(torch.bfloat16) == adapter_dtype(torch.float16) == torch.float32
    assert adapter_dtype(torch.float8_e4m3fn) == torch.float32
    assert adapter_dtype(torch.float32) == torch.float32 and adapter_dtype(torch.float64) == torch.float64
    assert adapter_dtype(torch.bfloat16, autocast_adapter_dtype=False) == torch.bfloat16


def test_a_small_adamw_step_moves_every_entry_of_a_bf16_models_lora():
    # In bf16 a step of 1e-4 on entries of magnitude ~0.05-0.2 is below half a unit in the last place (2^-12
    # at 0.05) and rounds away; in float32 every entry moves.
    model = adapt(tiny_llama(seed=0).to(torch.bfloat16), LoRAConfig(rank=4))
    layer = model.model.layers[0].self_attn.q_proj
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():  # a trained adapter: B no longer zero, so A gets a gradient too
        lora_B.copy_(0.05 * torch.randn(lora_B.shape, generator=torch.Generator().manual_seed(0)).sign())
    before = lora_A.detach().clone(), lora_B.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert lora_A.dtype == lora_B.dtype == torch.float32
    assert (lora_A != before[0]).all() and (lora_B != before[1]).all()


def _randomise(model, scale=0.05):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_keeps_float32_adapters_on_a_bf16_model_and_computes_as_in_float32(method):
    config = METHODS[method]
    model = adapt(tiny_llama(seed=0).to(torch.bfloat16), config, data=_batches())
    state = adapter_state(model, "default")
    assert state and {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    _randomise(model)
    # The same numbers in float32 throughout (bf16 base weights are exact in float32): the mixed model
    # differs only by its bf16 base computation.
    reference = copy.deepcopy(model).float()
    logits = model(IDS).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference(IDS).logits, rtol=0.05, atol=0.05)
    model(IDS, labels=IDS).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads if g is not None)

    kept = adapt(tiny_llama(seed=0).to(torch.bfloat16), config, data=_batches(), autocast_adapter_dtype=False)
    dtypes = {t.dtype for t in adapter_state(kept, "default").values() if t.is_floating_point()}
    assert dtypes == {torch.bfloat16}
    assert kept(IDS).logits.dtype == torch.bfloat16
