"""FP8 / FP4 weight quantization: configs, the streamed checkpoint, and what transformers and
compressed-tensors read back."""

import copy
import json
import warnings

import pytest
import torch
import transformers
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC, NVFP4A16
from safetensors.torch import load_file

from weightkit import load
from weightkit.cli import main
from weightkit.compress import compress, compress_checkpoint
from weightkit.compress.quant import FloatQuantizedLinear, FP4Config, FP8Config
from weightkit.compress.quant.export import save_quantized
from weightkit.errors import WeightkitError
from weightkit.quantized.compressed_tensors import float_tensors, quantization_config
from weightkit.quantized.float_grid import FloatScheme, float_quantize
from weightkit.quantized.grid import QuantScheme
from weightkit.recipe import dump_config, load_config
from weightkit.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.tensor([[1, 5, 17, 33, 64, 99, 127, 3, 8, 21, 40, 2]])


def linears(model) -> dict[str, FloatQuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FloatQuantizedLinear)}


def load_with_transformers(out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "quantization_config passed twice" and compressed-tensors notices
        return transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, **kwargs).eval()


def stored(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


# -- configs ------------------------------------------------------------------------------------------


def test_configs_refuse_what_they_cannot_do_by_name():
    with pytest.raises(WeightkitError, match="fp8_format must be 'e4m3' or 'e5m2', got 'e3m4'"):
        FP8Config(fp8_format="e3m4")
    with pytest.raises(WeightkitError, match="group_size 32 is not supported"):
        FP4Config(group_size=32)
    with pytest.raises(WeightkitError, match="power_of_two must be None, 'm1' or 'm2'"):
        FP8Config(power_of_two="m3")
    with pytest.raises(WeightkitError, match=r"unknown key\(s\) \['bits'\]"):
        FP8Config(overrides={"re:.*down_proj": {"bits": 4}})


@pytest.mark.parametrize(
    "config", [FP8Config(group_size=32, power_of_two="m2"), FP4Config()], ids=["fp8-g32-m2", "fp4"]
)
def test_configs_round_trip_through_a_recipe(tmp_path, config):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dump_config(config))
    assert load_config(recipe) == config


def test_fp8_overrides_change_the_grid_of_the_modules_they_match():
    config = FP8Config(
        group_size=16, overrides={"re:.*down_proj": {"group_size": None, "power_of_two": "m1"}}
    )
    assert config.scheme_for("model.layers.0.mlp.down_proj") == FloatScheme("e4m3", None, "m1")
    assert config.scheme_for("model.layers.0.mlp.up_proj") == FloatScheme("e4m3", 16, None)
    with pytest.raises(WeightkitError, match="power_of_two 'm2' ties"):
        FP8Config(group_size=16, power_of_two="m2", overrides={"re:.*down_proj": {"group_size": None}})


# -- in memory and streamed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [FP8Config(group_size=16, power_of_two="m1"), FP4Config()], ids=["fp8-g16-m1", "fp4"]
)
def test_compress_puts_every_selected_linear_on_its_grid(config):
    original = tiny_llama(seed=0)
    up = original.model.layers[1].mlp.up_proj.weight.detach().clone()
    model = compress(original, config, progress=False)
    layers = linears(model)
    assert len(layers) == 14 and not isinstance(model.lm_head, FloatQuantizedLinear)
    expected = float_quantize(up, config.scheme_for("up_proj"))
    got = layers["model.layers.1.mlp.up_proj"]
    assert torch.equal(got.qweight_bits, expected.qweight.view(torch.uint8))
    assert torch.equal(got.dequantized_weight(), expected.dequantize())


@pytest.mark.parametrize("config", [FP8Config(), FP4Config()], ids=["fp8", "fp4"])
def test_streamed_checkpoint_equals_compressing_the_loaded_model(tmp_path, llama_dir, config):
    streamed = compress_checkpoint(llama_dir, tmp_path / "streamed", config, progress=False)
    model = compress(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), config, progress=False)
    saved = save_quantized(model, tmp_path / "saved", source_dir=llama_dir)
    a, b = stored(streamed), stored(saved)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(
            a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)
        ), name
    qc = json.loads((streamed / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((saved / "config.json").read_text())["quantization_config"]


def test_casting_the_model_keeps_the_stored_format():
    """``.half()`` casts every floating-point tensor: the grid values and NVFP4's scales must not follow."""
    for config in (FP8Config(), FP4Config()):
        model = compress(tiny_llama(seed=0), config, progress=False)
        before = {n: float_tensors(m.quantized, None) for n, m in linears(model).items()}
        model.half()
        for name, layer in linears(model).items():
            after = float_tensors(layer.quantized, None)
            for suffix, tensor in after.items():
                if suffix == "weight_scale" and isinstance(config, FP8Config):
                    assert tensor.dtype == torch.float16  # the model's precision, as integer grids' scales
                    continue
                assert tensor.dtype == before[name][suffix].dtype
                assert torch.equal(
                    tensor.view(-1).view(torch.uint8), before[name][suffix].view(-1).view(torch.uint8)
                )


# -- compressed-tensors and transformers --------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 16])
def test_compressed_tensors_stores_and_restores_fp8_exactly_as_we_do(group_size):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    ours = float_quantize(w, FloatScheme("e4m3", group_size))
    strategy = "group" if group_size else "channel"
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="float", strategy=strategy, group_size=group_size),
    )
    packed = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": ours.scale}, scheme)
    assert packed["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(packed["weight"].view(torch.uint8), ours.qweight.view(torch.uint8))
    restored = FloatQuantizationCompressor.decompress(packed, scheme)["weight"]
    assert torch.equal(restored, ours.dequantize())


def test_compressed_tensors_stores_and_restores_nvfp4_exactly_as_we_do():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    ours = float_quantize(w, FloatScheme("e2m1", 16))
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16),
    )
    theirs = NVFP4PackedCompressor.compress(
        {"weight": w, "weight_scale": ours.scale.float(), "weight_global_scale": ours.global_scale}, scheme
    )
    mine = float_tensors(ours, None)
    assert torch.equal(mine["weight_packed"], theirs["weight_packed"])
    assert torch.equal(mine["weight_scale"].view(torch.uint8), theirs["weight_scale"].view(torch.uint8))
    restored = NVFP4PackedCompressor.decompress(mine, scheme)["weight"]
    assert torch.equal(restored, ours.dequantize())


@pytest.mark.parametrize(
    "config", [FP8Config(), FP8Config(group_size=16, power_of_two="m2")], ids=["fp8-channel", "fp8-g16-m2"]
)
def test_transformers_loads_fp8_with_our_weights_bit_for_bit(tmp_path, llama_dir, config):
    out = compress_checkpoint(llama_dir, tmp_path / "fp8", config, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == qc["config_groups"]["group_0"]["format"] == "float-quantized"
    assert stored(out)["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    ours = compress(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), config, progress=False)
    loaded = load_with_transformers(out)
    with torch.no_grad():
        got, expected = loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # After its first forward transformers holds the decompressed weights: exactly ours.
    for name, layer in linears(ours).items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.dequantized_weight()), name


def test_transformers_loads_nvfp4_in_bfloat16_or_dequantized(tmp_path, llama_dir):
    out = compress_checkpoint(llama_dir, tmp_path / "fp4", FP4Config(), progress=False)
    tensors = stored(out)
    assert tensors["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.uint8
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.mlp.up_proj.weight_global_scale"].shape == (1,)
    ours = compress(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), FP4Config(), progress=False)
    for kwargs in (
        {"dtype": torch.bfloat16},
        {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)},
    ):
        loaded = load_with_transformers(out, **kwargs)
        with torch.no_grad():
            loaded(input_ids=IDS)
        for name, layer in linears(ours).items():
            weight = loaded.get_submodule(name).weight
            assert torch.equal(weight.to(torch.bfloat16), layer.dequantized_weight()), (name, kwargs)


@pytest.mark.xfail(
    raises=RuntimeError,
    strict=True,
    reason="compressed-tensors 0.20's NVFP4 decompressor returns bfloat16 weights whatever the model dtype "
    "(unpack_fp4_from_uint8's default), so a float32 model's first forward fails with a dtype mismatch",
)
def test_transformers_default_float32_path_runs_nvfp4(tmp_path, llama_dir):
    out = compress_checkpoint(llama_dir, tmp_path / "fp4", FP4Config(), progress=False)
    with torch.no_grad():
        load_with_transformers(out)(input_ids=IDS)


@pytest.mark.parametrize("config", [FP8Config(group_size=16), FP4Config()], ids=["fp8-g16", "fp4"])
def test_weightkit_load_reads_the_export_back_exactly(tmp_path, llama_dir, config):
    out = compress_checkpoint(llama_dir, tmp_path / "q", config, progress=False)
    ours = compress(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), config, progress=False)
    loaded = load(out)
    got = linears(loaded)
    assert got.keys() == linears(ours).keys()
    for name, layer in linears(ours).items():
        assert got[name].scheme == layer.scheme
        assert torch.equal(got[name].qweight_bits, layer.qweight_bits), name
        assert torch.equal(got[name].dequantized_weight(), layer.dequantized_weight()), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, ours(input_ids=IDS).logits)


def test_weightkit_load_refuses_float_schemes_it_cannot_hold(tmp_path, llama_dir):
    out = compress_checkpoint(llama_dir, tmp_path / "q", FP8Config(), progress=False)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightkitError, match="strategy 'tensor'"):
        load(out)
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        strategy="channel", num_bits=4
    )
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightkitError, match="num_bits 4"):
        load(out)


def test_quantization_config_equals_compressed_tensors_presets_and_refuses_mixed_formats():
    fp8 = quantization_config({"a": FloatScheme("e4m3")}, ["lm_head"])
    assert fp8["format"] == "float-quantized"
    assert fp8["config_groups"]["group_0"]["weights"] == FP8_DYNAMIC["weights"].model_dump(mode="json")
    nvfp4 = quantization_config({"a": FloatScheme("e2m1", 16)}, ["lm_head"])
    assert nvfp4["format"] == "nvfp4-pack-quantized"
    assert nvfp4["config_groups"]["group_0"]["weights"] == NVFP4A16["weights"].model_dump(mode="json")
    with pytest.raises(WeightkitError, match="float-quantized and pack-quantized grids: one checkpoint"):
        quantization_config({"a": FloatScheme("e4m3"), "b": QuantScheme(4, 16)}, [])


def test_e5m2_is_refused_before_anything_is_written(tmp_path, llama_dir):
    with pytest.raises(WeightkitError, match="E5M2 weights cannot be saved"):
        compress_checkpoint(llama_dir, tmp_path / "out", FP8Config(fp8_format="e5m2"), progress=False)
    model = compress(tiny_llama(seed=0), FP8Config(fp8_format="e5m2"), progress=False)
    assert linears(model)["model.layers.0.mlp.up_proj"].quantized.qweight.dtype == torch.float8_e5m2
    with pytest.raises(WeightkitError, match="E5M2 weights cannot be saved"):
        save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- command line -------------------------------------------------------------------------------------


def test_cli_fp8_and_fp4(tmp_path, capsys, llama_dir):
    argv = ["compress", str(llama_dir), "--json", "--method"]
    assert main([*argv, "fp8", "-o", str(tmp_path / "a"), "--group-size", "16", "--power-of-two", "m1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"] == {**summary["config"], "method": "fp8", "group_size": 16, "power_of_two": "m1"}
    assert main([*argv, "fp4", "-o", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out)["compression_ratio"] > 1
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: fp8\ngroup_size: 16\npower_of_two: m1\n")
    assert (
        main(["compress", str(llama_dir), "--json", "--recipe", str(recipe), "-o", str(tmp_path / "r")]) == 0
    )
    capsys.readouterr()
    a, r = stored(tmp_path / "a"), stored(tmp_path / "r")
    assert a.keys() == r.keys() and all(
        torch.equal(a[k].view(torch.uint8), r[k].view(torch.uint8)) for k in a
    )
    for bad, message in (
        (["fp4", "--group-size", "32"], "groups are 16 columns; --group-size 32 is not supported"),
        (["fp4", "--power-of-two", "m1"], "--power-of-two applies to --method fp8 only, not fp4"),
        (["fp8", "--bits", "4"], "--bits applies to --method rtn or gptq or awq or gwq or flexround or vptq"),
        (["fp8", "--fp8-format", "e5m2"], "E5M2 weights cannot be saved"),
    ):
        assert main([*argv, *bad, "-o", str(tmp_path / "c")]) == 1
        assert message in " ".join(capsys.readouterr().err.split())
        assert not (tmp_path / "c").exists()


# -- quality ------------------------------------------------------------------------------------------


def test_fp8_e4m3_per_channel_keeps_minilm_embeddings_and_beats_e5m2(minilm):
    """E4M3 per channel loses about 0.2% embedding fidelity on MiniLM (0.9981 on the demo's 256 held-out
    texts; int8 RTN per channel: 0.9995); E5M2's coarser mantissa loses several times more."""
    from weightkit.data import stdlib_docstrings
    from weightkit.eval.embedding import mean_cosine, sentence_embeddings

    model, tokenizer = minilm
    texts = stdlib_docstrings("eval", max_chars=1000)[:8]
    reference = sentence_embeddings(model, tokenizer, texts, max_length=64)
    fidelity = {}
    for fmt in ("e4m3", "e5m2"):
        quantized = compress(copy.deepcopy(model), FP8Config(fp8_format=fmt), progress=False)
        fidelity[fmt] = mean_cosine(
            reference, sentence_embeddings(quantized, tokenizer, texts, max_length=64)
        )
    assert 0.997 < fidelity["e4m3"] < 1
    assert 1 - fidelity["e5m2"] > 2 * (1 - fidelity["e4m3"])
