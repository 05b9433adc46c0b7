"""weightkit.load of weightkit's own VPTQ and GWQ checkpoint format: exact round trips, sizes, refusals, and
transformers failing loudly on it."""

import json
import shutil
import struct

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from weightkit import load
from weightkit.adapt import LoRAConfig, adapt
from weightkit.checkpoint import weights_size
from weightkit.compress.quant.export import save_quantized
from weightkit.compress.quant.gwq import gwq_quantize
from weightkit.compress.quant.vptq import vptq_quantize
from weightkit.errors import WeightkitError
from weightkit.inspect.compare import compare
from weightkit.inspect.report import inspect_checkpoint
from weightkit.inspect.similarity import weight_similarity
from weightkit.models import load_model
from weightkit.quantized.codebook import VPTQSpec
from weightkit.quantized.compressed_tensors import is_quantized_checkpoint, refuse_quantized
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.quantized.linear import OutlierQuantizedLinear, VPTQLinear
from weightkit.quantized.outliers import SparseOutlierWeight, outlier_storage_bits
from weightkit.testing import tiny_llama

IDS = torch.tensor([[1, 5, 17, 33, 64, 99, 127, 3, 8, 21]])
Q_PROJ = "model.layers.0.self_attn.q_proj"


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")
    }


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def vptq_weights() -> dict:
    """VPTQ weights of tiny_llama(seed=1)'s 14 block linears, from random Hessians: 1 to 6 index bits
    (k = 2 ... 64), every third layer with a residual codebook of 4 codewords."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for i, (name, linear) in enumerate(block_linears(tiny_llama(seed=1)).items()):
        x = torch.randn(48, linear.in_features, generator=g)
        spec = VPTQSpec(8, 2 ** (1 + i % 6), 4 if i % 3 == 0 else 0)
        weights[name] = vptq_quantize(linear.weight.detach(), x.T @ x, spec, kmeans_iterations=4, seed=i)
    return weights


def vptq_model(weights: dict, dtype=torch.float32) -> nn.Module:
    model = tiny_llama(seed=1).to(dtype)
    for name, quantized in weights.items():  # after the cast: the codebooks stay float16
        model.set_submodule(name, VPTQLinear(quantized, None))
    return model


SCHEMES = [
    QuantScheme(3, 8, False),
    QuantScheme(4, None, True),
    QuantScheme(2, 16, True),
    QuantScheme(3, 32, True),
]


def gwq_model(dtype=torch.float32, *, symmetric_only=False) -> nn.Module:
    """tiny_llama(seed=1) in ``dtype`` with GWQ layers (random gradients), 3% outliers (none in one layer)."""
    model = tiny_llama(seed=1).to(dtype)
    g = torch.Generator().manual_seed(1)
    schemes = [s for s in SCHEMES if s.symmetric] if symmetric_only else SCHEMES
    for i, (name, linear) in enumerate(block_linears(model).items()):
        weight = linear.weight.detach()
        gradient = torch.randn(weight.shape, generator=g)
        fraction = 0.0 if i == 5 else 0.03
        quantized = gwq_quantize(
            weight, gradient, schemes[i % len(schemes)], outlier_fraction=fraction, name=name
        )
        model.set_submodule(name, OutlierQuantizedLinear(quantized, linear.bias))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vptq_checkpoint_loads_back_bit_identical(vptq_weights, tmp_path, dtype):
    model = vptq_model(vptq_weights, dtype)
    save_quantized(model, tmp_path / "vptq")
    config = json.loads((tmp_path / "vptq/config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "weightkit"
    assert config["quantization_config"]["format"] == "vptq"
    loaded = load(tmp_path / "vptq")
    for name, quantized in vptq_weights.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, VPTQLinear)
        assert torch.equal(layer.indices, quantized.indices)
        assert layer.quantized.codebook.dtype == torch.float16
        assert torch.equal(layer.quantized.codebook, quantized.codebook)
        if quantized.residual_codebook is not None:
            assert torch.equal(layer.residual_indices, quantized.residual_indices)
            assert torch.equal(layer.quantized.residual_codebook, quantized.residual_codebook)
    assert loaded.model.embed_tokens.weight.dtype == dtype
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gwq_checkpoint_loads_back_bit_identical(tmp_path, dtype):
    model = gwq_model(dtype)
    save_quantized(model, tmp_path / "gwq")
    qc = json.loads((tmp_path / "gwq/config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("weightkit", "gwq", ["lm_head"])
    loaded = load(tmp_path / "gwq")
    outliers = 0
    for name in block_linears(tiny_llama(seed=1)):
        ours, theirs = model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(theirs, OutlierQuantizedLinear) and theirs.scheme == ours.scheme
        for buffer in ("qweight", "weight_scale", "weight_zero_point", "outlier_index", "outlier_value_bits"):
            a, b = getattr(ours, buffer), getattr(theirs, buffer)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, buffer)
        outliers += len(theirs.outlier_index)
    assert outliers > 0 and loaded.model.layers[0].mlp.up_proj.outlier_index.numel() == 0  # the 0% layer
    assert loaded.model.layers[0].self_attn.q_proj.quantized.outlier_value.dtype == (
        torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    )
    assert torch.equal(logits(loaded), logits(model))


def test_load_dtype_casts_the_model_but_not_codebooks_or_outliers(vptq_weights, tmp_path):
    save_quantized(vptq_model(vptq_weights), tmp_path / "vptq")
    loaded = load(tmp_path / "vptq", dtype=torch.bfloat16)
    assert loaded.get_submodule(Q_PROJ).quantized.codebook.dtype == torch.float16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(vptq_model(vptq_weights, torch.bfloat16)))

    model = gwq_model()
    save_quantized(model, tmp_path / "gwq")
    loaded = load(tmp_path / "gwq", dtype=torch.bfloat16)
    expected = tiny_llama(seed=1).to(torch.bfloat16)
    for name in block_linears(expected):
        q = model.get_submodule(name).quantized
        scale = q.dense.scale.to(torch.bfloat16)
        dense = QuantizedWeight(q.dense.qweight, scale, q.dense.zero_point, q.dense.scheme)
        expected.set_submodule(
            name, OutlierQuantizedLinear(SparseOutlierWeight(dense, q.outlier_index, q.outlier_value), None)
        )
    layer = loaded.get_submodule(Q_PROJ)
    assert layer.weight_scale.dtype == torch.bfloat16 and layer.quantized.outlier_value.dtype == torch.float16
    assert torch.equal(logits(loaded), logits(expected))


def tensor_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def plain_bytes(model: nn.Module, quantized: list[str]) -> int:
    return sum(
        t.numel() * t.element_size()
        for n, t in model.state_dict().items()
        if not n.startswith(tuple(f"{q}." for q in quantized))
    )


def test_vptq_file_holds_exactly_the_index_and_codebook_bits(vptq_weights, tmp_path):
    model = vptq_model(vptq_weights)
    save_quantized(model, tmp_path / "vptq")
    expected = plain_bytes(model, list(vptq_weights))  # embeddings, norms, lm_head
    for name, quantized in vptq_weights.items():
        spec, shape = quantized.spec, tuple(model.get_submodule(name).dequantized_weight().shape)
        vectors = shape[0] // spec.vector_length * shape[1]
        # VPTQSpec's count of the bits, each bit stream rounded up to whole bytes, plus weight_shape.
        index_bits, codebook_bits = spec.storage_bits(shape)
        main_bits = spec.centroids.bit_length() - 1
        residual_bits = index_bits - vectors * main_bits
        expected += -(-vectors * main_bits // 8) + -(-residual_bits // 8) + codebook_bits // 8 + 16
    assert tensor_bytes(tmp_path / "vptq/model.safetensors") == expected
    assert weights_size(tmp_path / "vptq") - expected < 120 * len(
        load_file(tmp_path / "vptq/model.safetensors")
    )


def test_gwq_file_holds_exactly_the_grid_and_outlier_bits(tmp_path):
    model = gwq_model(torch.bfloat16, symmetric_only=True)  # 16-bit scales, as outlier_storage_bits counts
    save_quantized(model, tmp_path / "gwq")
    layers = block_linears(tiny_llama(seed=1))
    expected = plain_bytes(model, list(layers))
    for name in layers:
        layer = model.get_submodule(name)
        bits = outlier_storage_bits(tuple(layer.qweight.shape), layer.scheme, len(layer.outlier_index))
        expected += bits // 8 + 16  # + weight_shape
    assert tensor_bytes(tmp_path / "gwq/model.safetensors") == expected


@pytest.mark.parametrize("kind", ["vptq", "gwq"])
def test_transformers_refuses_the_checkpoint_instead_of_loading_random_layers(vptq_weights, tmp_path, kind):
    model = vptq_model(vptq_weights) if kind == "vptq" else gwq_model()
    save_quantized(model, tmp_path / kind)
    # transformers skips the unknown quant_method with a warning; the 1-D NAME.weight then stops it.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind)


def edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def saved(vptq_weights, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("saved")
    save_quantized(vptq_model(vptq_weights), root / "vptq")
    save_quantized(gwq_model(), root / "gwq")
    return {"vptq": root / "vptq", "gwq": root / "gwq"}


@pytest.mark.parametrize(
    "kind, edit, match",
    [
        (
            "vptq",
            lambda t: t.update({f"{Q_PROJ}.weight_codebook": t[f"{Q_PROJ}.weight_codebook"].float()}),
            rf"{Q_PROJ}\.weight_codebook is torch\.float32",
        ),
        (
            "vptq",
            lambda t: t.update({f"{Q_PROJ}.weight": t[f"{Q_PROJ}.weight"][:-1]}),
            rf"{Q_PROJ}\.weight is",
        ),
        ("vptq", lambda t: t.pop(f"{Q_PROJ}.weight_residual"), rf"{Q_PROJ}: weight_residual and"),
        (
            "vptq",
            lambda t: t.update({f"{Q_PROJ}.weight_shape": torch.tensor([16, 32])}),
            rf"{Q_PROJ}\.weight_shape is \[16, 32\]",
        ),
        (
            "gwq",
            lambda t: t.update(
                {f"{Q_PROJ}.weight_outlier_index": t[f"{Q_PROJ}.weight_outlier_index"].flip(0)}
            ),
            rf"{Q_PROJ}\.weight_outlier_index is not strictly ascending",
        ),
        (
            "gwq",
            lambda t: t[f"{Q_PROJ}.weight_outlier_index"].__setitem__(-1, 32 * 32),
            rf"{Q_PROJ}\.weight_outlier_index holds positions .* outside the 1024 entries",
        ),
        ("gwq", lambda t: t.pop(f"{Q_PROJ}.weight"), rf"{Q_PROJ}\.weight \(the outlier values\) is missing"),
        # A layer without outliers is a compressed-tensors layer: a mix of formats.
        (
            "gwq",
            lambda t: (t.pop(f"{Q_PROJ}.weight"), t.pop(f"{Q_PROJ}.weight_outlier_index")),
            rf"{Q_PROJ} stores weight_scale, but a weightkit gwq layer stores weight_outlier_index, "
            "weight_scale",
        ),
    ],
)
def test_load_names_the_corrupted_tensor(saved, tmp_path, kind, edit, match):
    broken = tmp_path / kind
    shutil.copytree(saved[kind], broken)
    edit_tensors(broken, edit)
    with pytest.raises(WeightkitError, match=match):
        load(broken)


def edit_quantization_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def test_load_refuses_a_checkpoint_whose_layers_are_not_its_configs_format(saved, tmp_path):
    gwq_config = json.loads((saved["gwq"] / "config.json").read_text())["quantization_config"]
    shutil.copytree(saved["vptq"], tmp_path / "as_gwq")
    edit_quantization_config(tmp_path / "as_gwq", lambda qc: qc.update(gwq_config))
    with pytest.raises(WeightkitError, match=r"stores weight_codebook, but a weightkit gwq layer stores"):
        load(tmp_path / "as_gwq")
    shutil.copytree(saved["gwq"], tmp_path / "as_vptq")
    edit_quantization_config(tmp_path / "as_vptq", lambda qc: qc.update(format="vptq"))
    with pytest.raises(
        WeightkitError, match=r"stores weight_outlier_index, weight_scale, but a weightkit vptq"
    ):
        load(tmp_path / "as_vptq")
    shutil.copytree(saved["vptq"], tmp_path / "unknown")
    edit_quantization_config(tmp_path / "unknown", lambda qc: qc.update(format="aqlm"))
    with pytest.raises(WeightkitError, match=r"format 'aqlm' is not a weightkit checkpoint format"):
        load(tmp_path / "unknown")


def test_verbs_needing_full_precision_refuse_it_by_name(saved):
    config = json.loads((saved["gwq"] / "config.json").read_text())
    assert is_quantized_checkpoint(config)
    with pytest.raises(
        WeightkitError, match=r"quantized checkpoint \(weightkit vptq\).*\(weightkit eval works on"
    ):
        refuse_quantized(saved["vptq"], verb="merging", instead="merge the full-precision models")
    with pytest.raises(WeightkitError, match=r"quantized checkpoint \(weightkit gwq, 2 and 3 and 4 bits\)"):
        refuse_quantized(saved["gwq"], verb="merging", instead="merge the full-precision models")


def test_other_verbs_handle_it_or_refuse_it_by_name(saved, tmp_path):
    # eval and adapt's training load through load_model: the quantized layers, as weightkit.load gives.
    model, _, task = load_model(saved["vptq"])
    assert task == "causal-lm" and isinstance(model.get_submodule(Q_PROJ), VPTQLinear)
    for kind, layer in (("vptq", "VPTQLinear"), ("gwq", "OutlierQuantizedLinear")):
        with pytest.raises(WeightkitError, match=rf"{Q_PROJ} is a {layer} layer .* adapters do not work"):
            adapt(load(saved[kind]), LoRAConfig(targets=["all-linear"]))

    base = tmp_path / "base"
    base.mkdir()
    tiny_llama(seed=1).save_pretrained(base)
    with pytest.raises(WeightkitError, match=r"quant_method 'weightkit', format 'gwq' is not supported"):
        compare(base, [saved["gwq"]])
    with pytest.raises(WeightkitError, match="is a quantized checkpoint"):
        weight_similarity(saved["vptq"])
    with pytest.raises(WeightkitError, match=r"quantized checkpoint \(weightkit vptq\)"):
        inspect_checkpoint(saved["vptq"])
    # A bare weights file (no config.json to say it is quantized): refused by its codebook tensors.
    shutil.copy(saved["vptq"] / "model.safetensors", tmp_path / "bare.safetensors")
    with pytest.raises(WeightkitError, match="holds quantized tensors"):
        inspect_checkpoint(tmp_path / "bare.safetensors")
