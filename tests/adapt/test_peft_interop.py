"""PEFT interop across architectures: ``all-linear`` picks PEFT's modules, and LoRA/DoRA adapters made by
either tool give the other's outputs (within 1e-5, float32), with a classification head saved in full.

The cases are :data:`tests.adapt.peft_interop.CASES`; the README's interop table is rendered from them.
"""

import pytest
import torch
from adapt.peft_interop import ARCHITECTURES, CASES, METHODS
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from weightkit.adapt import LoRAConfig, adapt, load_adapter, save_adapter
from weightkit.adapt.layer import adapter_layers
from weightkit.errors import WeightkitError
from weightkit.select import all_linear_modules

BY_NAME = {arch.name: arch for arch in ARCHITECTURES}


def _run(model, arch):
    out = model(**arch.inputs)
    return getattr(out, arch.output) if arch.output else out


def _randomise(model, names, seed=1):
    """Move every tensor whose name contains one of ``names`` (adapter factors, magnitudes, the head)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if any(n in key for n in names):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def _peft_targets(arch):
    """The modules PEFT adapts for ``target_modules="all-linear"`` on this architecture."""
    peft_model = get_peft_model(
        arch.build(), PeftLoraConfig(target_modules="all-linear", task_type=arch.task_type)
    )
    return set(peft_model.base_model.targeted_module_names)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name.split()[0])
def test_all_linear_picks_the_modules_peft_picks(arch):
    assert set(all_linear_modules(arch.build())) == _peft_targets(arch)


@pytest.mark.parametrize(("arch_name", "method", "direction"), CASES)
def test_an_adapter_gives_the_other_tools_outputs(arch_name, method, direction, tmp_path):
    arch = BY_NAME[arch_name]
    dora = METHODS[method].get("use_dora", False)
    if direction.startswith("weightkit"):
        ours = adapt(
            arch.build(), LoRAConfig(rank=4, alpha=8, dora=dora, targets=["all-linear", *arch.extra_targets])
        )
        _randomise(ours, ["lora_", *(f"{h}." for h in arch.head)])
        save_adapter(ours, tmp_path / "adapter", modules_to_save=list(arch.head))
        theirs = PeftModel.from_pretrained(arch.build(), tmp_path / "adapter").eval()
    else:
        targets = all_linear_modules(arch.build()) + list(arch.extra_targets)
        head = list(arch.head) or None
        config = PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=targets, modules_to_save=head, **METHODS[method]
        )
        theirs = get_peft_model(arch.build(), config).eval()
        _randomise(theirs, ["lora_", *(f"{h}.modules_to_save" for h in arch.head)])
        theirs.save_pretrained(tmp_path)
        ours = load_adapter(arch.build(), tmp_path)
    assert len(adapter_layers(ours)) == len(all_linear_modules(arch.build())) + len(arch.extra_targets)
    expected = _run(theirs, arch)
    assert (expected - _run(arch.build(), arch)).abs().max() > 1e-2  # the adapter changes the outputs
    torch.testing.assert_close(_run(ours, arch), expected, rtol=1e-5, atol=1e-5)


def test_a_rank_above_a_layers_smaller_side_works_as_in_peft(tmp_path):
    # PEFT's "all-linear" without a task type adapts a 3-class head too, at rank 8 > 3; weightkit refused it.
    arch = BY_NAME["BERT (sequence classifier)"]
    theirs = get_peft_model(
        arch.build(), PeftLoraConfig(r=8, lora_alpha=8, target_modules="all-linear")
    ).eval()
    assert "classifier" in theirs.base_model.targeted_module_names
    _randomise(theirs, ["lora_"])
    theirs.save_pretrained(tmp_path)
    torch.testing.assert_close(_run(load_adapter(arch.build(), tmp_path), arch), _run(theirs, arch))


def test_an_embedding_with_its_own_forward_is_refused_by_name():
    # OPT's learned positions are an nn.Embedding subclass called with an attention mask: wrapping them
    # crashed in the forward.
    opt = BY_NAME["OPT"]
    with pytest.raises(
        WeightkitError, match="embed_positions: OPTLearnedPositionalEmbedding has its own forward"
    ):
        adapt(opt.build(), LoRAConfig(targets=["re:.*"]))
