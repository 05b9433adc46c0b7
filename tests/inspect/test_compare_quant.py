"""Quantization error of compressed-tensors checkpoints: weightkit's own (compress) and compressed-tensors'
own packing (what llm-compressor writes), checked against independent dequantizations."""

import json
import math

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file

import weightkit
from weightkit.compress import RTNConfig, compress_checkpoint
from weightkit.errors import WeightkitError
from weightkit.inspect.compare import compare
from weightkit.inspect.quant_error import quantization_error, relative_error, sqnr_db
from weightkit.quantized.linear import QuantizedLinear
from weightkit.testing import save_tiny, tiny_llama


def test_sqnr_of_known_error():
    weight = torch.tensor([3.0, 4.0])
    assert sqnr_db(weight, torch.tensor([3.0, 4.5])) == pytest.approx(10 * math.log10(25 / 0.25))  # 20 dB
    assert sqnr_db(weight, weight) == math.inf
    assert relative_error(weight, torch.tensor([3.0, 4.5])) == pytest.approx(0.1)
    with pytest.raises(WeightkitError, match="all zeros"):
        sqnr_db(torch.zeros(2), torch.ones(2))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("q") / "base")


def _numpy_sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.double().numpy(), w_hat.double().numpy()
    return 10 * np.log10((w**2).sum() / ((w - w_hat) ** 2).sum())


@pytest.mark.parametrize("symmetric", [True, False])
def test_sqnr_of_weightkit_compress_checkpoints_matches_the_loaded_model(tiny_base, tmp_path, symmetric):
    base = dict(tiny_llama().state_dict())
    summaries = {}
    for bits in (4, 8):
        out = compress_checkpoint(
            tiny_base,
            tmp_path / f"q{bits}",
            RTNConfig(bits=bits, group_size=16, symmetric=symmetric),
            progress=False,
        )
        table = quantization_error(tiny_base, out)
        rows = {row["name"]: row for row in table.rows}
        model = weightkit.load(out)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        assert len(layers) == table.summary["quantized_layers"] == 14
        for name, layer in layers.items():
            row = rows[f"{name}.weight"]
            assert (row["bits"], row["group_size"], row["symmetric"]) == (bits, 16, symmetric)
            w, w_hat = base[f"{name}.weight"], layer.quantized.dequantize()
            assert row["sqnr_db"] == pytest.approx(_numpy_sqnr(w, w_hat), rel=1e-9)
        # Unquantized tensors (embeddings, norms, the ignored lm_head) are exact copies.
        assert rows["lm_head.weight"]["quantized"] is False and rows["lm_head.weight"]["sqnr_db"] == math.inf
        assert table.summary["mismatched"] == 0
        summaries[bits] = table.summary
    assert summaries[8]["sqnr_db"] > summaries[4]["sqnr_db"] + 20  # ~6 dB per bit
    assert summaries[8]["relative_error"] < summaries[4]["relative_error"]
    assert list(compare(tiny_base, [tmp_path / "q4"])) == [f"quantization:{tmp_path / 'q4'}"]


def _ct_layer(weight: torch.Tensor, args: QuantizationArgs) -> dict:
    """One layer packed by compressed-tensors itself, with its own min/max quantization parameters."""
    group = args.group_size or weight.shape[1]
    grouped = weight.reshape(weight.shape[0], -1, group)
    scale, zero_point = calculate_qparams(grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0), args)
    state = {"weight": weight, "weight_scale": scale}
    if not args.symmetric:
        state["weight_zero_point"] = zero_point
    return PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))


_CT_ARGS = {
    "model.a": QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="channel"),
    "model.b": QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16),
}


@pytest.fixture
def ct_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "model.a.weight": torch.randn(8, 32, generator=g),
        "model.b.weight": torch.randn(16, 32, generator=g),
        "model.norm.weight": torch.ones(32),
    }
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    stored = {"model.norm.weight": base["model.norm.weight"]}
    groups = {}
    for i, (layer, args) in enumerate(_CT_ARGS.items()):
        for suffix, tensor in _ct_layer(base[f"{layer}.weight"], args).items():
            stored[f"{layer}.{suffix}"] = tensor.contiguous()
        groups[f"group_{i}"] = {"targets": [layer], "weights": args.model_dump(), "format": "pack-quantized"}
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    save_file(stored, quantized / "model.safetensors")
    config = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": [],
            "sparsity_config": {},
        }
    }
    (quantized / "config.json").write_text(json.dumps(config))
    return tmp_path / "base", quantized, base, stored


def test_compressed_tensors_packing_dequantizes_as_compressed_tensors_does(ct_checkpoint):
    base_dir, quantized, base, stored = ct_checkpoint
    table = quantization_error(base_dir, quantized)
    rows = {row["name"]: row for row in table.rows}
    for layer, args in _CT_ARGS.items():
        packed = {k.removeprefix(f"{layer}."): v for k, v in stored.items() if k.startswith(f"{layer}.")}
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        reference = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
        row = rows[f"{layer}.weight"]
        assert row["sqnr_db"] == pytest.approx(_numpy_sqnr(base[f"{layer}.weight"], reference), rel=1e-9)
        assert (row["bits"], row["group_size"], row["symmetric"]) == (
            args.num_bits,
            args.group_size,
            args.symmetric,
        )
    assert rows["model.norm.weight"]["quantized"] is False
    assert table.summary["quantized_layers"] == 2 and table.summary["mismatched"] == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda qc: qc["config_groups"]["group_0"]["weights"].update(type="float"), "type 'float'"),
        (lambda qc: qc["config_groups"]["group_0"].update(format="naive-quantized"), "naive-quantized"),
        (lambda qc: qc.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(actorder="group"),
            "activation ordering",
        ),
        (lambda qc: qc.update(quantization_status="frozen"), "quantization_status 'frozen'"),
    ],
)
def test_unsupported_quantization_configs_are_refused_by_name(ct_checkpoint, edit, message):
    base_dir, quantized, _, _ = ct_checkpoint
    config = json.loads((quantized / "config.json").read_text())
    edit(config["quantization_config"])
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightkitError, match=message):
        quantization_error(base_dir, quantized)


def test_a_g_idx_tensor_is_refused(ct_checkpoint):
    base_dir, quantized, _, stored = ct_checkpoint
    save_file(
        {**stored, "model.a.weight_g_idx": torch.zeros(32, dtype=torch.int32)},
        quantized / "model.safetensors",
    )
    with pytest.raises(WeightkitError, match="g_idx"):
        quantization_error(base_dir, quantized)


def test_a_tensor_that_cannot_be_compared_is_one_row_not_two(ct_checkpoint):
    base_dir, quantized, base, stored = ct_checkpoint
    save_file({**base, "model.ids": torch.arange(4)}, base_dir / "model.safetensors")
    save_file(
        {**stored, "model.ids": torch.arange(4), "model.c.weight": torch.ones(2)},
        quantized / "model.safetensors",
    )
    rows = [row for row in quantization_error(base_dir, quantized).rows if row["status"] == "mismatch"]
    assert [(row["name"], row["reason"]) for row in rows] == [
        ("model.ids", "not a floating-point tensor (torch.int64)"),
        ("model.c.weight", "absent in base"),
    ]


def test_a_pruned_then_quantized_checkpoint_is_measured_against_its_pruned_source(tiny_base, tmp_path):
    """A recipe's 2:4 + RTN output carries a "dense" sparsity_config (zeros stored as they are): its error is
    measured like any pack-quantized checkpoint; a compressed sparse format stays refused (above)."""
    from weightkit.compress import MagnitudeConfig

    pruned = compress_checkpoint(
        tiny_base, tmp_path / "pruned", MagnitudeConfig(sparsity="2:4"), progress=False
    )
    quantized = compress_checkpoint(pruned, tmp_path / "q", RTNConfig(bits=8, group_size=16), progress=False)
    qc = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "dense" and qc["sparsity_config"]["sparsity_structure"] == "2:4"
    table = quantization_error(pruned, quantized)
    assert table.summary["quantized_layers"] == 14 and table.summary["mismatched"] == 0
    assert all(row["sqnr_db"] > 30 for row in table.rows if row["quantized"])  # 8 bits of the pruned weights
