"""weightkit.models: model kinds, offline loading (plain, and pack-quantized into QuantizedLinear), blocks."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from weightkit import load
from weightkit.compress.quant.export import save_quantized
from weightkit.compress.quant.module import quantize_linear
from weightkit.errors import WeightkitError
from weightkit.models import default_model_path, load_model
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.quantized.linear import QuantizedLinear
from weightkit.testing import save_tiny, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer


def test_gpt2_loads_as_a_causal_lm(tmp_path):
    model, tokenizer, task = load_model(save_tiny(tiny_gpt2(), tmp_path / "gpt2", tiny_tokenizer()))
    assert task == "causal-lm" and tokenizer is not None
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(model(ids).logits, tiny_gpt2()(ids).logits, rtol=0, atol=0)


def test_load_model_round_trips_a_saved_tiny_model(tmp_path):
    model, tok = tiny_llama(seed=2), tiny_tokenizer(128)
    out = save_tiny(model, tmp_path / "llama", tok)
    loaded, loaded_tok, kind = load_model(out)
    assert kind == "causal-lm" and isinstance(loaded, transformers.LlamaForCausalLM) and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab()
    ids = tok(["the lazy dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    bf16, _, _ = load_model(out, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16

    bert_dir = save_tiny(tiny_bert(), tmp_path / "bert")
    bert, no_tok, kind = load_model(bert_dir)
    assert kind == "encoder" and isinstance(bert, transformers.BertModel) and no_tok is None


def test_load_model_returns_quantized_layers_for_a_quantized_dir(tmp_path):
    model = tiny_llama(seed=3)
    src = save_tiny(model, tmp_path / "src", tiny_tokenizer(128))
    name = "model.layers.1.mlp.down_proj"
    linear = model.get_submodule(name)
    model.set_submodule(
        name, QuantizedLinear.from_linear(linear, rtn_quantize(linear.weight.detach(), QuantScheme(4, 32)))
    )
    out = save_quantized(model, tmp_path / "q", source_dir=src)
    loaded, tok, kind = load_model(out)
    assert kind == "causal-lm" and tok is not None
    assert isinstance(loaded.get_submodule(name), QuantizedLinear)
    assert torch.equal(loaded.get_submodule(name).qweight, model.get_submodule(name).qweight)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, nn.Linear)


def test_load_model_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(WeightkitError):
        load_model(tmp_path)  # empty
    (tmp_path / "README.md").write_text("# notes")
    with pytest.raises(WeightkitError):
        load_model(tmp_path)
    with pytest.raises(WeightkitError):
        load_model(tmp_path / "missing")
    # Pickle weights are refused, naming the file.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model = tiny_bert()
    model.config.to_json_file(pickled / "config.json")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(WeightkitError, match="pytorch_model.bin"):
        load_model(pickled)
    # A model type the installed transformers does not know: the error names it.
    unknown = save_tiny(tiny_llama(), tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    with pytest.raises(WeightkitError, match="model_type 'nonesuch' is not"):
        load_model(unknown)


def test_default_model_loads_offline_and_embeds_meaningfully():
    """The bundled MiniLM, with the hub switched off before anything imports it (a fresh interpreter)."""
    script = textwrap.dedent(
        """
        import json, torch
        from weightkit.models import default_model_path, load_model
        model, tok, kind = load_model(default_model_path())
        texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell today."]
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        near, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
        print(json.dumps({"kind": kind, "cls": type(model).__name__, "shape": list(hidden.shape),
                          "training": model.training, "near": near, "far": far}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kind"] == "encoder" and result["cls"] == "BertModel" and not result["training"]
    assert result["shape"][0] == 3 and result["shape"][2] == 384
    # A pretrained sentence encoder puts paraphrases much closer than unrelated sentences.
    assert result["near"] > result["far"] + 0.3
    assert (default_model_path() / "config.json").is_file()


IDS = torch.tensor([[1, 5, 17, 33, 64, 99, 127, 3, 8, 21, 40, 2]])


def linears(kind: str) -> list[str]:
    if kind == "llama":
        parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        parts += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        return [f"model.layers.{i}.{p}" for i in range(2) for p in parts]
    parts = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
    parts += ["intermediate.dense", "output.dense"]
    return [f"encoder.layer.{i}.{p}" for i in range(2) for p in parts]


def quantize(model: nn.Module, schemes: dict[str, QuantScheme]) -> nn.Module:
    for name, scheme in schemes.items():
        quantize_linear(model, name, rtn_quantize(model.get_submodule(name).weight.detach(), scheme))
    return model


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def build(kind: str, seed: int = 0) -> nn.Module:
    return tiny_llama(seed=seed) if kind == "llama" else tiny_bert(seed=seed)


SCHEMES = [
    QuantScheme(4, 32, True),
    QuantScheme(4, 32, False),
    QuantScheme(8, None, True),
    QuantScheme(2, None, False),
    QuantScheme(3, 32, True),
    QuantScheme(3, None, False),
    QuantScheme(2, 32, False),
    QuantScheme(8, 32, False),
]


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-scheme", "mixed"])
def test_load_gives_back_the_exact_grids_and_outputs(tmp_path, kind, mixed):
    names = linears(kind)
    if mixed:
        schemes = {name: SCHEMES[i % len(SCHEMES)] for i, name in enumerate(names)}
    else:
        schemes = dict.fromkeys(names, QuantScheme(3, 32, False))
    model = quantize(build(kind), schemes)
    out = save_quantized(model, tmp_path / "q")

    loaded = load(out)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert "quantization_config" not in loaded.config.to_dict()
    for name, scheme in schemes.items():
        ours, back = model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(back, QuantizedLinear), name
        assert back.scheme == scheme
        assert back.qweight.dtype == torch.int8 and torch.equal(back.qweight, ours.qweight), name
        assert torch.equal(back.weight_scale, ours.weight_scale), name
        if scheme.symmetric:
            assert back.weight_zero_point is None
        else:
            assert back.weight_zero_point.dtype == torch.int8
            assert torch.equal(back.weight_zero_point, ours.weight_zero_point), name
        if ours.bias is not None:
            assert torch.equal(back.bias, ours.bias)
    # Everything else is the stored float state, so the outputs are bit-identical.
    assert torch.equal(outputs(loaded), outputs(model))


def test_load_reads_checkpoints_written_by_compressed_tensors(tmp_path):
    """A checkpoint written by compressed-tensors itself (regex and exact targets, an ignore list)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    model = tiny_llama(seed=5)
    reference = tiny_llama(seed=5)
    groups = {
        "group_0": QuantizationScheme(
            targets=["re:.*self_attn\\.(q|k)_proj$"],
            weights=QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=32),
        ),
        "group_1": QuantizationScheme(
            targets=["re:.*mlp\\..*"],
            weights=QuantizationArgs(num_bits=3, symmetric=False, strategy="group", group_size=32),
        ),
        "group_2": QuantizationScheme(
            targets=["model.layers.0.self_attn.o_proj"],
            weights=QuantizationArgs(num_bits=2, symmetric=False, strategy="channel"),
        ),
    }
    config = QuantizationConfig(config_groups=groups, ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, config)
    # compressed-tensors' observers are not run: give every layer min/max qparams computed by hand.
    for _, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        args = scheme.weights
        w = module.weight.detach().reshape(
            module.weight.shape[0], -1, args.group_size or module.weight.shape[1]
        )
        levels = 2**args.num_bits - 1
        if args.symmetric:
            scale = w.abs().amax(-1) / (levels / 2)
        else:
            lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
            scale = (hi - lo) / levels
            module.weight_zero_point.data = (-(2 ** (args.num_bits - 1)) - torch.round(lo / scale)).to(
                torch.int8
            )
        module.weight_scale.data = scale
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(tmp_path / "ct")

    loaded = load(tmp_path / "ct")
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    expected = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qk"}
    expected |= {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    expected |= {"model.layers.0.self_attn.o_proj"}
    assert quantized == expected
    assert loaded.get_submodule("model.layers.0.self_attn.o_proj").scheme == QuantScheme(2, None, False)
    assert loaded.get_submodule("model.layers.1.mlp.up_proj").scheme == QuantScheme(3, 32, False)
    # compressed-tensors decompresses its own checkpoint to exactly our dequantized weights.
    compressor.decompress_model(model)
    for name in quantized:
        assert torch.equal(
            loaded.get_submodule(name).dequantized_weight(), model.get_submodule(name).weight
        ), name
    # And the unquantized layers are the float originals.
    assert torch.equal(
        loaded.model.layers[1].self_attn.o_proj.weight, reference.model.layers[1].self_attn.o_proj.weight
    )
    assert torch.equal(outputs(loaded), outputs(model))


def test_load_plain_directory_returns_the_saved_class(tmp_path):
    torch.manual_seed(0)
    config = tiny_bert().config
    model = transformers.BertForMaskedLM(config).eval()
    out = save_tiny(model, tmp_path / "mlm")
    loaded = load(out)
    assert type(loaded) is transformers.BertForMaskedLM
    assert torch.equal(outputs(loaded), outputs(model))


def test_load_dtype_casts_floats_and_scales(tmp_path):
    model = quantize(tiny_llama(), dict.fromkeys(linears("llama"), QuantScheme(4, 32, False)))
    out = save_quantized(model, tmp_path / "q")
    loaded = load(out, dtype=torch.bfloat16)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.weight_scale.dtype == torch.bfloat16
    assert torch.equal(layer.qweight, model.model.layers[0].self_attn.q_proj.qweight)
    assert layer.weight_zero_point.dtype == torch.int8
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(outputs(loaded).float(), outputs(model), atol=0.1, rtol=0.05)


def test_load_strips_the_base_model_prefix_of_a_head_checkpoint(tmp_path):
    """A quantized classifier loaded as the bare BertModel (head dropped), as transformers' loader allows."""
    from weightkit.models import load_quantized

    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification(tiny_bert().config).eval()
    quantize(classifier, {f"bert.{n}": QuantScheme(4, 32, True) for n in linears("bert")})
    out = save_quantized(classifier, tmp_path / "q")
    bare = load_quantized(out, model_cls=transformers.AutoModel)
    assert type(bare) is transformers.BertModel
    ours = classifier.bert.encoder.layer[1].output.dense.qweight
    assert torch.equal(bare.encoder.layer[1].output.dense.qweight, ours)
    with torch.no_grad():
        expected = classifier.bert(input_ids=IDS).last_hidden_state
    assert torch.equal(outputs(bare), expected)
    # The other way round a tensor is missing (BertForMaskedLM has no pooler): refused by name.
    mlm = quantize(
        transformers.BertForMaskedLM(tiny_bert().config), {f"bert.{linears('bert')[0]}": QuantScheme(4, 32)}
    )
    out = save_quantized(mlm, tmp_path / "mlm")
    with pytest.raises(WeightkitError, match=r"pooler\.dense\.weight"):
        load_quantized(out, model_cls=transformers.AutoModel)


def test_load_refuses_non_model_directories(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(WeightkitError):
        load(tmp_path)
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    save_file({"w": torch.zeros(2)}, weights_only / "model.safetensors")
    with pytest.raises(WeightkitError, match="config.json"):
        load(weights_only)


@pytest.fixture
def quantized_dir(tmp_path):
    model = quantize(tiny_llama(), dict.fromkeys(linears("llama"), QuantScheme(4, 32, False)))
    return save_quantized(model, tmp_path / "q")


def edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_load_refuses_quantization_weightkit_cannot_represent(quantized_dir):
    def to_float8(qc):
        qc["config_groups"]["group_0"]["weights"].update(type="float", num_bits=8)

    edit_config(quantized_dir, to_float8)
    with pytest.raises(WeightkitError, match="group_0.*float"):
        load(quantized_dir)

    def to_other_format(qc):
        qc["format"] = "float-quantized"
        qc["config_groups"]["group_0"]["format"] = None

    edit_config(quantized_dir, to_other_format)
    with pytest.raises(WeightkitError, match="float-quantized"):
        load(quantized_dir)


def test_load_names_missing_and_misshapen_tensors(quantized_dir, tmp_path):
    broken = tmp_path / "no_zp"
    shutil.copytree(quantized_dir, broken)
    edit_tensors(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_zero_point"))
    with pytest.raises(WeightkitError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_zero_point"):
        load(broken)

    broken = tmp_path / "no_norm"
    shutil.copytree(quantized_dir, broken)
    edit_tensors(broken, lambda t: t.pop("model.layers.0.input_layernorm.weight"))
    with pytest.raises(WeightkitError, match=r"model\.layers\.0\.input_layernorm\.weight"):
        load(broken)

    broken = tmp_path / "bad_shape"
    shutil.copytree(quantized_dir, broken)
    edit_tensors(
        broken, lambda t: t.update({"model.layers.0.mlp.down_proj.weight_shape": torch.tensor([32, 32])})
    )
    with pytest.raises(WeightkitError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_shape"):
        load(broken)

    broken = tmp_path / "untargeted"
    shutil.copytree(quantized_dir, broken)
    edit_config(broken, lambda qc: qc["ignore"].append("model.layers.0.mlp.down_proj"))
    with pytest.raises(WeightkitError, match=r"model\.layers\.0\.mlp\.down_proj"):
        load(broken)


def test_load_refuses_pickle_unless_allowed(tmp_path):
    model = tiny_bert(seed=4)
    model.config.to_json_file(tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightkitError, match="pytorch_model.bin"):
        load(tmp_path)
    loaded = load(tmp_path, allow_pickle=True)
    assert torch.equal(outputs(loaded), outputs(model))


def test_loaded_tokenizers_cut_text_to_what_the_models_positions_take(tmp_path):
    # A tiny OPT has 128 positions and its saved tokenizer no length limit: a 512-token cut used to index
    # past the position embeddings (IndexError in weightkit fisher with its default --seq-len 512).
    from weightkit.data import tokenize_batches
    from weightkit.models import load_tokenizer

    path = save_tiny(tiny_llama(max_position_embeddings=64), tmp_path / "llama", tiny_tokenizer(128))
    tokenizer = load_tokenizer(path)
    assert tokenizer.model_max_length == 64
    [batch] = tokenize_batches(tokenizer, ["the quick brown fox " * 100], max_length=512, batch_size=1)
    assert batch["input_ids"].shape == (1, 64)
