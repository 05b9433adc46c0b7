"""Export to compressed-tensors "pack-quantized": what compressed-tensors writes and transformers loads."""

import json
import warnings

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

from weightkit import load
from weightkit.checkpoint import CheckpointReader, weights_size
from weightkit.compress.quant.export import save_quantized
from weightkit.compress.quant.module import quantize_linear
from weightkit.errors import WeightkitError
from weightkit.quantized.compressed_tensors import quantization_config, scheme_from_weights_args
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.testing import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer

LLAMA_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
BERT_LINEARS = ["attention.self.query", "attention.self.key", "attention.self.value"]
BERT_LINEARS += ["attention.output.dense", "intermediate.dense", "output.dense"]

SYM_G32 = QuantScheme(bits=4, group_size=32, symmetric=True)
ASYM_G32 = QuantScheme(bits=3, group_size=32, symmetric=False)
CHANNEL_SYM = QuantScheme(bits=8, group_size=None, symmetric=True)
CHANNEL_ASYM = QuantScheme(bits=2, group_size=None, symmetric=False)


def block_linears(kind: str) -> list[str]:
    if kind == "llama":
        return [f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_LINEARS]
    return [f"encoder.layer.{i}.{p}" for i in range(2) for p in BERT_LINEARS]


def quantize(model: nn.Module, schemes: dict[str, QuantScheme]) -> nn.Module:
    for name, scheme in schemes.items():
        quantize_linear(model, name, rtn_quantize(model.get_submodule(name).weight.detach(), scheme))
    return model


def mixed_schemes(kind: str, symmetric: bool | None = None) -> dict[str, QuantScheme]:
    """Bits 2, 3, 4, 8 over groups of 32 and whole channels, cycling over the blocks' linear layers."""
    cycle = [
        QuantScheme(4, 32, True),
        QuantScheme(3, 32, False),
        QuantScheme(8, None, True),
        QuantScheme(2, None, False),
        QuantScheme(2, 32, True),
        QuantScheme(8, 32, False),
        QuantScheme(3, None, True),
        QuantScheme(4, None, False),
    ]
    if symmetric is not None:
        cycle = [QuantScheme(s.bits, s.group_size, symmetric) for s in cycle]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(block_linears(kind))}


def build(kind: str):
    if kind == "llama":
        return tiny_llama(seed=1), tiny_tokenizer(128), transformers.AutoModelForCausalLM
    return tiny_bert(seed=1), tiny_tokenizer(128, kind="encoder"), transformers.AutoModel


def outputs(model: nn.Module, kind: str) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 17, 33, 64, 99, 127, 3, 8, 21, 40, 2]])
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if kind == "llama" else out.last_hidden_state


def load_with_transformers(auto_cls, out, *, dequantize: bool = False):
    kwargs = {}
    if dequantize:
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "quantization_config passed twice": we only override dequantize
        return auto_cls.from_pretrained(out, local_files_only=True, **kwargs).eval()


# -- quantization_config ------------------------------------------------------------------------------


def test_quantization_config_single_scheme_targets_linear_and_keeps_ignore():
    cfg = quantization_config({"a.q": SYM_G32, "a.k": SYM_G32}, ignore=["lm_head"])
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["format"] == "pack-quantized"
    assert cfg["quantization_status"] == "compressed"
    assert cfg["ignore"] == ["lm_head"]
    assert list(cfg["config_groups"]) == ["group_0"]
    group = cfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["format"] == "pack-quantized"
    assert group["input_activations"] is None and group["output_activations"] is None
    assert group["weights"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "group_size": 32,
        "strategy": "group",
        "dynamic": False,
        "actorder": None,
    }


def test_quantization_config_groups_modules_by_scheme_with_exact_names():
    modules = {"m.a": SYM_G32, "m.b": ASYM_G32, "m.c": SYM_G32, "m.d": CHANNEL_SYM, "m.e": CHANNEL_ASYM}
    cfg = quantization_config(modules, ignore=["m.f"])
    groups = cfg["config_groups"]
    assert [g["targets"] for g in groups.values()] == [["m.a", "m.c"], ["m.b"], ["m.d"], ["m.e"]]
    weights = [g["weights"] for g in groups.values()]
    assert [(w["num_bits"], w["symmetric"], w["strategy"], w["group_size"]) for w in weights] == [
        (4, True, "group", 32),
        (3, False, "group", 32),
        (8, True, "channel", None),
        (2, False, "channel", None),
    ]
    # Round trip: reading the block back gives every module its scheme.
    back = {t: scheme_from_weights_args(g["weights"], "test") for g in groups.values() for t in g["targets"]}
    assert back == modules


def test_quantization_config_is_accepted_by_compressed_tensors_and_transformers():
    from compressed_tensors.quantization import QuantizationConfig

    cfg = quantization_config({"m.a": ASYM_G32, "m.b": CHANNEL_SYM}, ignore=["lm_head"])
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.format == "pack-quantized"
    args = parsed.config_groups["group_0"].weights
    assert (args.num_bits, args.symmetric, args.strategy, args.group_size) == (3, False, "group", 32)
    assert parsed.config_groups["group_1"].weights.strategy == "channel"
    hf = transformers.CompressedTensorsConfig.from_dict(json.loads(json.dumps(cfg)))
    assert hf.is_quantization_compressed


def test_quantization_config_refuses_empty_or_contradictory_input():
    with pytest.raises(WeightkitError, match="no quantized modules"):
        quantization_config({}, ignore=[])
    with pytest.raises(WeightkitError, match="m.a"):
        quantization_config({"m.a": SYM_G32}, ignore=["m.a"])


def test_scheme_from_weights_args_refuses_what_weightkit_cannot_hold():
    with pytest.raises(WeightkitError, match="float"):
        scheme_from_weights_args(
            {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "g0"
        )
    with pytest.raises(WeightkitError, match="tensor"):
        scheme_from_weights_args(
            {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"}, "g0"
        )
    with pytest.raises(WeightkitError, match="g_idx"):
        args = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32, "actorder": "group"}
        scheme_from_weights_args(args, "g0")


# -- the files are what compressed-tensors itself writes ----------------------------------------------


def test_save_quantized_writes_the_same_tensors_as_compressed_tensors(tmp_path):
    """Same model, same grids: our export and compressed-tensors' ModelCompressor agree tensor for tensor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    schemes = mixed_schemes("llama")
    ours = quantize(tiny_llama(seed=2), schemes)
    ours_dir = save_quantized(ours, tmp_path / "ours")

    # The reference: a float model whose quantized layers hold our dequantized weights, with our scales
    # and zero points attached, compressed and saved by compressed-tensors.
    ref = tiny_llama(seed=2)
    groups = {}
    for i, (name, s) in enumerate(schemes.items()):
        strategy = "group" if s.group_size else "channel"
        args = QuantizationArgs(
            num_bits=s.bits, symmetric=s.symmetric, strategy=strategy, group_size=s.group_size
        )
        groups[f"group_{i}"] = QuantizationScheme(targets=[name], weights=args)
    apply_quantization_config(ref, QuantizationConfig(config_groups=groups, format="pack-quantized"))
    for name in schemes:
        qlinear, linear = ours.get_submodule(name), ref.get_submodule(name)
        linear.weight.data = qlinear.dequantized_weight()
        linear.weight_scale.data = qlinear.weight_scale.clone()
        if qlinear.weight_zero_point is not None:
            linear.weight_zero_point.data = qlinear.weight_zero_point.clone()
        linear.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(ref)
    compressor.compress_model(ref)
    ref.save_pretrained(tmp_path / "ref")
    compressor.update_config(tmp_path / "ref")

    with (
        safe_open(ours_dir / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "ref/model.safetensors", "pt") as b,
    ):
        keys = list(a.keys())
        assert set(keys) == set(b.keys())
        assert any(k.endswith("weight_zero_point") for k in keys)
        for key in keys:
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key

    def module_schemes(directory):
        qc = json.loads((directory / "config.json").read_text())["quantization_config"]
        out = {}
        for group in qc["config_groups"].values():
            for target in group["targets"]:
                out[target] = scheme_from_weights_args(group["weights"], "test")
        return qc, out

    ours_qc, ours_map = module_schemes(ours_dir)
    ref_qc, ref_map = module_schemes(tmp_path / "ref")
    assert ours_map == ref_map == schemes
    for key in ("quant_method", "format", "quantization_status"):
        assert ours_qc[key] == ref_qc[key]
    assert sorted(ours_qc["ignore"]) == sorted(ref_qc["ignore"])


# -- transformers loads it through its compressed-tensors integration ----------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize(
    ("scheme", "dequantize"),
    [
        (SYM_G32, False),
        (CHANNEL_SYM, False),
        (QuantScheme(2, 32, True), False),
        (QuantScheme(3, None, True), False),
        # Asymmetric checkpoints go through transformers' dequantize-on-load path: its default path
        # cannot load any asymmetric pack-quantized checkpoint (see the xfail test below).
        (ASYM_G32, True),
        (CHANNEL_ASYM, True),
        (QuantScheme(4, 32, False), True),
        (QuantScheme(8, None, False), True),
    ],
    ids=lambda v: (
        f"deq={v}" if isinstance(v, bool) else f"b{v.bits}-{'sym' if v.symmetric else 'asym'}-g{v.group_size}"
    ),
)
def test_transformers_loads_the_export_with_the_same_outputs(tmp_path, kind, scheme, dequantize):
    model, tokenizer, auto_cls = build(kind)
    src = save_tiny(model, tmp_path / "src", tokenizer)
    quantize(model, dict.fromkeys(block_linears(kind), scheme))
    expected = outputs(model, kind)
    out = save_quantized(model, tmp_path / "q", source_dir=src)

    loaded = load_with_transformers(auto_cls, out, dequantize=dequantize)
    got = outputs(loaded, kind)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # After its first forward transformers holds dense weights: exactly our dequantized grids.
    for name in block_linears(kind):
        assert torch.equal(
            loaded.get_submodule(name).weight, model.get_submodule(name).dequantized_weight()
        ), name
    assert (
        transformers.AutoTokenizer.from_pretrained(out, local_files_only=True).get_vocab()
        == tokenizer.get_vocab()
    )


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_transformers_loads_mixed_symmetric_schemes(tmp_path, kind):
    """Bits 2, 3, 4 and 8 over groups and channels in one checkpoint: one config group per scheme."""
    model, _, auto_cls = build(kind)
    schemes = mixed_schemes(kind, symmetric=True)
    quantize(model, schemes)
    expected = outputs(model, kind)
    out = save_quantized(model, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == len(set(schemes.values())) == 8
    got = outputs(load_with_transformers(auto_cls, out), kind)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.xfail(
    raises=RuntimeError,
    reason="transformers 5.23 + compressed-tensors 0.20 build the zero point unpacked on load and reject the "
    "packed one (vllm-project/llm-compressor#1618); compressed-tensors' own checkpoints fail the same way",
)
def test_transformers_default_path_loads_asymmetric(tmp_path):
    model = quantize(tiny_llama(seed=1), dict.fromkeys(block_linears("llama"), ASYM_G32))
    out = save_quantized(model, tmp_path / "q")
    loaded = load_with_transformers(transformers.AutoModelForCausalLM, out)
    torch.testing.assert_close(outputs(loaded, "llama"), outputs(model, "llama"), atol=1e-5, rtol=0)


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    model = tiny_llama(seed=3, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize(model, dict.fromkeys(block_linears("llama"), SYM_G32))
    out = save_quantized(model, tmp_path / "q")
    with CheckpointReader(out) as reader:
        assert "model.embed_tokens.weight" in reader and "lm_head.weight" not in reader
    loaded = load_with_transformers(transformers.AutoModelForCausalLM, out)
    torch.testing.assert_close(outputs(loaded, "llama"), outputs(model, "llama"), atol=1e-5, rtol=0)
    ours = load(out)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(outputs(ours, "llama"), outputs(model, "llama"))


def test_export_is_smaller_than_the_float_original(tmp_path):
    model = tiny_llama(seed=4)
    src = save_tiny(model, tmp_path / "src")
    quantize(model, dict.fromkeys(block_linears("llama"), SYM_G32))
    out = save_quantized(model, tmp_path / "q", source_dir=src)
    with CheckpointReader(out) as reader:
        # Each 4-bit [out, in] layer: out * in / 8 bytes of packed words plus one fp32 scale per 32 weights.
        for name in block_linears("llama"):
            rows, cols = model.get_submodule(name).qweight.shape
            assert reader.shape(f"{name}.weight_packed") == (rows, cols * 4 // 32)
            assert reader.dtype(f"{name}.weight_packed") == torch.int32
            assert reader.shape(f"{name}.weight_scale") == (rows, cols // 32)
            assert f"{name}.weight" not in reader and f"{name}.weight_zero_point" not in reader
    linear_fp32 = sum(4 * model.get_submodule(n).qweight.numel() for n in block_linears("llama"))
    linear_packed = sum(
        (0.5 + 4 / 32) * model.get_submodule(n).qweight.numel() for n in block_linears("llama")
    )
    original, packed = weights_size(src), weights_size(out)
    # Only the block linears shrink; embeddings, head and norms are unchanged (headers differ a little).
    assert packed < original
    assert abs((original - packed) - (linear_fp32 - linear_packed)) < 0.05 * original


def test_save_quantized_refuses_unquantized_models_and_existing_dirs(tmp_path):
    with pytest.raises(WeightkitError, match="no quantized layers"):
        save_quantized(tiny_llama(), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    model = quantize(tiny_llama(), dict.fromkeys(block_linears("llama")[:1], SYM_G32))
    save_quantized(model, tmp_path / "q")
    with pytest.raises(WeightkitError, match="exists"):
        save_quantized(model, tmp_path / "q")
    save_quantized(model, tmp_path / "q", overwrite=True)
    # Only one layer quantized: the single group targets "Linear" and every other linear is ignored.
    qc = json.loads((tmp_path / "q/config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert sorted(qc["ignore"]) == sorted(block_linears("llama")[1:] + ["lm_head"])
