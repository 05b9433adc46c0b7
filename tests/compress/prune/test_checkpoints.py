"""Pruned checkpoints end to end: the CLI, recipes chaining pruning and quantization, transformers loading
the outputs, the recorded sparsity, and bad input refused with nothing written."""

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from weightkit import load
from weightkit.cli import main
from weightkit.compress import GPTQConfig, SparseGPTConfig, compress, compress_checkpoint
from weightkit.compress.prune.sparsegpt import sparsegpt_prune
from weightkit.compress.quant.gptq import gptq_quantize
from weightkit.compress.quant.hessian import Hessian
from weightkit.errors import WeightkitError
from weightkit.models import default_model_path, load_tokenizer
from weightkit.quantized.grid import QuantScheme, rtn_quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _measured(model) -> dict[str, float]:
    return {
        name: float((m.weight == 0).float().mean())
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def _assert_n_m(weight: torch.Tensor, n: int, m: int, name: str) -> None:
    zeros = (weight == 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
    assert (zeros >= n).all(), name


def test_sparsegpt_2_4_on_a_tiny_llama_through_the_cli(tmp_path, capsys, llama_dir, text_file):
    out = tmp_path / "pruned"
    code, stdout, err = run(
        capsys, "compress", llama_dir, "-o", out, "--method", "sparsegpt", "--sparsity", "2:4",
        "--calib", text_file, "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["config"]["sparsity"] == "2:4"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)  # an ordinary checkpoint
    original = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True)
    assert model.dtype == original.dtype
    record = json.loads((out / "sparsity.json").read_text())
    measured = _measured(model)
    assert record["structure"] == "2:4" and set(record["layers"]) == {n for n in measured if "layers." in n}
    for name, fraction in record["layers"].items():
        assert fraction == pytest.approx(measured[name], abs=1e-6)
        _assert_n_m(model.get_submodule(name).weight, 2, 4, name)
    assert measured["lm_head"] == 0  # ignored by default
    # The same as in memory (streamed block by block equals the whole model at once).
    tokenizer = load_tokenizer(llama_dir)
    in_memory = compress(
        original, SparseGPTConfig(sparsity="2:4"), str(text_file), tokenizer=tokenizer, progress=False
    )
    for name, m in in_memory.named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.testing.assert_close(m.weight, model.get_submodule(name).weight)


def test_wanda_on_the_bundled_minilm_through_the_cli(tmp_path, capsys):
    out = tmp_path / "minilm-wanda"
    code, _, err = run(
        capsys, "compress", default_model_path(), "-o", out, "--method", "wanda", "--sparsity", "0.5",
        "--calib-samples", "16", "--seq-len", "64",
    )  # fmt: skip
    assert code == 0, err
    model = AutoModel.from_pretrained(out, local_files_only=True)
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "wanda" and len(record["layers"]) == 36  # 6 layers x 6 linears
    measured = _measured(model)
    for name, fraction in record["layers"].items():
        assert fraction == pytest.approx(measured[name], abs=1e-6)
        weight = model.get_submodule(name).weight
        assert ((weight == 0).sum(dim=1) >= weight.shape[1] // 2).all()  # per output row
    assert record["global_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_magnitude_and_random_stream_and_record_their_sparsity(tmp_path, llama_dir):
    for method, config in [
        ("magnitude", {"method": "magnitude", "sparsity": 0.3}),
        ("random", {"method": "random", "sparsity": 0.3, "seed": 1}),
    ]:
        from weightkit.registry import config_from_dict

        out = compress_checkpoint(
            llama_dir, tmp_path / method, config_from_dict("compress", config), progress=False
        )
        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        record = json.loads((out / "sparsity.json").read_text())
        for name, fraction in record["layers"].items():
            weight = model.get_submodule(name).weight
            assert int((weight == 0).sum()) == int(0.3 * weight.numel())  # exactly, per layer
            assert fraction == pytest.approx(_measured(model)[name], abs=1e-6)


def _pruned_layer(seed: int):
    """A 2:4 SparseGPT-pruned layer, its inputs' Hessian and held-out inputs (correlated features)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=g)
    mixing = torch.eye(128) + 0.5 * torch.randn(128, 128, generator=g)
    x_fit, x_test = (torch.randn(2048, 128, generator=g) @ mixing for _ in range(2))
    hessian = Hessian()
    hessian.add(x_fit)
    h = hessian.value()
    return sparsegpt_prune(w, h, sparsity=0.5, n_m=(2, 4)), h, x_test


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_keep_zeros_keeps_every_zero_exactly(symmetric):
    pruned, h, _ = _pruned_layer(0)
    scheme = QuantScheme(4, 32, symmetric)
    kept = gptq_quantize(pruned, h, scheme, keep_zeros=True).dequantize()
    assert torch.equal(kept[pruned == 0], torch.zeros(int((pruned == 0).sum())))
    _assert_n_m(kept, 2, 4, "weight")
    refilled = gptq_quantize(pruned, h, scheme).dequantize()
    assert (refilled[pruned == 0] != 0).sum() > 50  # without it, moved errors round some zeros away


@pytest.mark.parametrize("seed", range(4))
def test_gptq_with_keep_zeros_beats_rtn_of_the_pruned_weight_on_held_out_inputs(seed):
    pruned, h, x_test = _pruned_layer(seed)
    scheme = QuantScheme(4, 32, True)

    def error(weight):  # the quantization stage's output error on held-out inputs
        return float(((pruned - weight) @ x_test.T).square().mean())

    kept = gptq_quantize(pruned, h, scheme, keep_zeros=True).dequantize()
    assert error(kept) < 0.96 * error(rtn_quantize(pruned, scheme).dequantize())


def test_a_recipe_of_sparsegpt_2_4_then_gptq_w4_loads_in_transformers(tmp_path, capsys, llama_dir, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        'stages:\n  - {method: sparsegpt, sparsity: "2:4"}\n  - {method: gptq, bits: 4, group_size: 32}\n'
    )
    out = tmp_path / "w4-24"
    code, stdout, err = run(
        capsys, "compress", llama_dir, "-o", out, "--recipe", recipe, "--calib", text_file, "--json"
    )
    assert code == 0, err
    stages = json.loads(stdout)["config"]
    assert [c["method"] for c in stages] == ["sparsegpt", "gptq"] and stages[1]["keep_zeros"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w4-24")]  # temporary stages removed
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    ours = load(out)
    for name in sparsity["targets"]:
        _assert_n_m(ours.get_submodule(name).quantized.dequantize(), 2, 4, name)
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, atol=1e-5, rtol=1e-5)
    assert (
        "sparsegpt + gptq" in (out / "README.md").read_text()
        and '"keep_zeros": true' in (out / "README.md").read_text()
    )
    assert str(tmp_path) not in (out / "README.md").read_text().replace(str(llama_dir), "")


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[{method: gptq}, {method: magnitude}]", "comes before pruning stage magnitude"),
        ("[{method: magnitude}, {method: gptq}, {method: rtn}]", "two quantization stages"),
        ("[{method: magnitude}, {method: vptq}]", "vptq after pruning is not supported"),
        ('[{method: magnitude, sparsity: "3:6"}]', "model.layers.0.self_attn.q_proj has 32 inputs"),
        ("[{method: magnitude, sparsity: 1.5}]", "sparsity must be a fraction"),
        ('[{method: wanda, sparsity: "4:2"}]', "1 <= N < M"),
        ('[{method: sparsegpt, sparsity: "2-4"}]', "'N:M' such as '2:4'"),
    ],
)
def test_bad_stages_are_refused_with_nothing_written(tmp_path, capsys, llama_dir, stages, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages: {stages}\n")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", llama_dir, "-o", out, "--recipe", recipe)
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert message in " ".join(err.split())
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_the_cli_refuses_an_n_m_that_does_not_divide_a_layer_by_name(tmp_path, capsys, llama_dir):
    code, _, err = run(
        capsys, "compress", llama_dir, "-o", tmp_path / "o", "--method", "magnitude", "--sparsity", "5:12"
    )
    assert code == 1 and "has 32 inputs, not a multiple of 12" in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_quantizing_a_pruned_checkpoint_keeps_its_zeros_or_is_refused(tmp_path, llama_dir):
    from weightkit.compress import MagnitudeConfig

    pruned = compress_checkpoint(
        llama_dir, tmp_path / "pruned", MagnitudeConfig(sparsity="2:4"), progress=False
    )
    with pytest.raises(WeightkitError, match="would not keep its zeros: quantize it with rtn, awq or gptq"):
        compress_checkpoint(pruned, tmp_path / "refilled", GPTQConfig(group_size=32), progress=False)
    assert not (tmp_path / "refilled").exists()
    out = compress_checkpoint(
        pruned, tmp_path / "kept", GPTQConfig(group_size=32, keep_zeros=True, calib_samples=8), progress=False
    )
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    record = json.loads((pruned / "sparsity.json").read_text())
    assert sparsity["global_sparsity"] == record["global_sparsity"] and sparsity["targets"] == list(
        record["layers"]
    )
    model = load(out)
    for name in sparsity["targets"]:
        _assert_n_m(model.get_submodule(name).quantized.dequantize(), 2, 4, name)


def test_stages_in_memory_refuse_bad_orders():
    with pytest.raises(WeightkitError, match="two quantization stages"):
        compress(torch.nn.Linear(4, 4), [GPTQConfig(), GPTQConfig()])
