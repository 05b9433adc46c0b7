"""A checkpoint read with a LoRA adapter merged in (``model+lora`` in merge recipes) equals PEFT's
``merge_and_unload``."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from weightkit.adapt import LoRAMergedReader
from weightkit.errors import WeightkitError
from weightkit.merge.engine import split_reference
from weightkit.testing import save_tiny, tiny_llama


def _trained_adapter(model, config, out):
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("dtype", "settings"),
    [
        (torch.float32, {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
        (
            torch.float32,
            {"target_modules": ["q_proj", "down_proj"], "use_dora": True, "rank_pattern": {"q_proj": 3}},
        ),
        (torch.float32, {"target_modules": ["o_proj"], "modules_to_save": ["lm_head"]}),
        (torch.bfloat16, {"target_modules": ["q_proj", "up_proj"]}),
    ],
    ids=["lora-embedding", "dora-rank-pattern", "modules-to-save", "bf16"],
)
def test_a_model_read_with_its_adapter_merged_equals_pefts_merge_and_unload(tmp_path, dtype, settings):
    base = save_tiny(tiny_llama(seed=0).to(dtype), tmp_path / "base")
    adapter = _trained_adapter(
        AutoModelForCausalLM.from_pretrained(base, dtype=dtype), LoraConfig(r=2, lora_alpha=4, **settings),
        tmp_path / "adapter",
    )  # fmt: skip
    # What mergekit does for "base+adapter": load in the checkpoint's dtype, merge with PEFT, save.
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    expected = merged.merge_and_unload().state_dict()
    with LoRAMergedReader(base, adapter) as reader:
        changed = 0
        for name in reader.names():
            tensor = reader.get(name)
            assert tensor.dtype == dtype
            torch.testing.assert_close(
                tensor, expected[name], rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 0
            )
            buffer = torch.empty(tensor.numel(), dtype=torch.float32)
            torch.testing.assert_close(reader.read_into(name, buffer), tensor.float(), rtol=0, atol=0)
            changed += not torch.equal(tensor, tiny_llama(seed=0).to(dtype).state_dict()[name])
        assert changed >= 3


def test_references_split_at_the_last_plus_unless_the_path_exists(tmp_path):
    assert split_reference("org/model+org/adapter") == ("org/model", "org/adapter")
    plus = tmp_path / "a+b"
    plus.mkdir()
    assert split_reference(str(plus)) == (str(plus), None)


def test_an_adapter_that_does_not_fit_or_is_not_lora_is_refused(tmp_path):
    base = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    adapter = _trained_adapter(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a")
    other = save_tiny(tiny_llama(seed=0, num_hidden_layers=1), tmp_path / "other")
    with pytest.raises(WeightkitError, match="adapts model.layers.1.self_attn.q_proj.weight, which"):
        LoRAMergedReader(other, adapter)
    config = (adapter / "adapter_config.json").read_text().replace('"LORA"', '"IA3"')
    (adapter / "adapter_config.json").write_text(config)
    with pytest.raises(WeightkitError, match="a IA3 adapter; model\\+adapter references take LoRA"):
        LoRAMergedReader(base, adapter)


def test_a_model_plus_adapter_reference_merges_as_the_merged_model_does(tmp_path):
    # mergekit's "model+lora": the same output as merging the model PEFT merged the adapter into.
    from weightkit.merge import merge
    from weightkit.merge.recipe import merge_recipe_from_dict

    base = save_tiny(tiny_llama(seed=0), tmp_path / "base")
    save_tiny(tiny_llama(seed=1), tmp_path / "other")
    adapter = _trained_adapter(
        tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), tmp_path / "adapter"
    )
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    outputs = {}
    for name, first in (("reference", "merged"), ("lora", "base+adapter")):
        doc = {"models": [{"model": first, "parameters": {"weight": 0.3}}, {"model": "other"}],
               "merge_method": "linear"}  # fmt: skip
        recipe = merge_recipe_from_dict(doc, relative_to=tmp_path)
        merge(recipe.base, recipe.models, recipe.config, tmp_path / name, progress=False)
        outputs[name] = load_file(tmp_path / name / "model.safetensors")
    assert outputs["lora"].keys() == outputs["reference"].keys()
    for key, tensor in outputs["reference"].items():
        torch.testing.assert_close(outputs["lora"][key], tensor, rtol=0, atol=1e-7, msg=key)


def test_a_gpt2_fan_in_fan_out_adapter_merges_as_pefts_merge_and_unload(tmp_path):
    # GPT-2's Conv1D weights are stored in x out: the reader learns which from the model's layers.
    from weightkit.testing import tiny_gpt2

    base = save_tiny(tiny_gpt2(seed=0), tmp_path / "base")
    config = LoraConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = _trained_adapter(tiny_gpt2(seed=0), config, tmp_path / "a")
    expected = PeftModel.from_pretrained(tiny_gpt2(seed=0), adapter).merge_and_unload().state_dict()
    with LoRAMergedReader(base, adapter) as reader:
        assert len(reader.changed_names()) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks
        for name in reader.names():
            torch.testing.assert_close(reader.get(name), expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_merge_adapter_writes_what_peft_merge_and_unload_gives(tmp_path, capsys, tied):
    import json

    from weightkit.cli import main

    base = save_tiny(tiny_llama(seed=0, tie_word_embeddings=tied), tmp_path / "base")
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=not tied
    )
    adapter = _trained_adapter(AutoModelForCausalLM.from_pretrained(base), config, tmp_path / "adapter")
    expected = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapter
    ).merge_and_unload()
    code = main(["merge-adapter", str(base), str(adapter), "-o", str(tmp_path / "out"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["merged"] == 5  # 2 q_proj, 2 down_proj, the embedding
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert ours.config.tie_word_embeddings == tied
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    torch.testing.assert_close(ours(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
