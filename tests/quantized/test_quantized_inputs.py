"""Every verb that needs full-precision weights refuses a quantized checkpoint with one message, before it
writes anything; eval works on it."""

import json

import pytest

from weightkit.cli import main
from weightkit.quantized.compressed_tensors import quantization_description
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

EXPECTED = "is a quantized checkpoint (compressed-tensors pack-quantized, 4 bits): weightkit {verb} needs"


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory):
    return save_tiny(tiny_llama(seed=1), tmp_path_factory.mktemp("other") / "model", tiny_tokenizer(128))


def _argv(verb, quantized, plain, tmp_path):
    out = str(tmp_path / "out")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {plain}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {quantized}\n    parameters: {{weight: 0.5}}\n"
    )
    return {
        "compress": ["compress", quantized, "-o", out, "--method", "rtn", "--bits", "4"],
        "merge": ["merge", recipe, "-o", out],
        "extract-lora": ["extract-lora", plain, quantized, "-r", "2", "-o", out],
        "align": ["align", plain, quantized, "-o", out],
        "fisher": ["fisher", quantized, "-o", tmp_path / "out.safetensors", "--samples", "2"],
        "merge-adapter": ["merge-adapter", quantized, tmp_path / "adapter", "-o", out],
    }[verb]


@pytest.mark.parametrize("verb", ["compress", "merge", "extract-lora", "align", "fisher", "merge-adapter"])
def test_verbs_refuse_a_quantized_checkpoint_with_one_message(
    verb, quantized_llama_dir, other_llama_dir, tmp_path, capsys
):
    argv = _argv(verb, quantized_llama_dir, other_llama_dir, tmp_path)
    assert main([str(a) for a in argv]) == 1
    err = " ".join(capsys.readouterr().err.split())  # the console may wrap long lines
    assert f"{quantized_llama_dir} " + EXPECTED.format(verb=verb) in err
    assert "full-precision" in err.split("needs full-precision weights;")[1]  # what to do instead
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


def test_eval_works_on_a_quantized_checkpoint(quantized_llama_dir, llama_dir, text_file, capsys):
    results = {}
    for name, model_dir in (("quantized", quantized_llama_dir), ("original", llama_dir)):
        assert main(["eval", str(model_dir), "--data", str(text_file), "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)["perplexity"]
    # 4-bit rounding moves a random tiny model's perplexity, but not far.
    assert results["quantized"] != results["original"]
    assert results["quantized"] == pytest.approx(results["original"], rel=0.2)


def test_quantization_description_names_the_method_format_and_bits(quantized_llama_dir):
    config = json.loads((quantized_llama_dir / "config.json").read_text())
    assert quantization_description(config) == "compressed-tensors pack-quantized, 4 bits"
    config["quantization_config"]["config_groups"]["group_1"] = {"weights": {"num_bits": 8}}
    assert quantization_description(config) == "compressed-tensors pack-quantized, 4 and 8 bits"
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 3}}
    assert quantization_description(gptq) == "gptq, 3 bits"
    assert quantization_description({"model_type": "llama"}) is None
