"""SVD and WeLore checkpoints: streamed output equals in-memory compress + save, weightkit.load gives back the
same outputs bit for bit (tiny Llama, bundled MiniLM), transformers refuses them, bad input writes nothing."""

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import weightkit
from weightkit.checkpoint import CheckpointReader
from weightkit.compress import SVDConfig, WeLoreConfig, compress, compress_checkpoint
from weightkit.compress.quant.export import save_quantized
from weightkit.errors import WeightkitError
from weightkit.models import default_model_path, load_model
from weightkit.quantized.lowrank import LowRankLinear
from weightkit.testing import model_output, save_tiny, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = {"svd": SVDConfig(ratio=0.5), "welore": WeLoreConfig(rank_reduction=0.4)}


def tensors(path):
    with CheckpointReader(path) as reader:
        return {name: reader.get(name) for name in reader.names()}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_streamed_equals_in_memory_and_loads_back_bit_identical(llama_dir, tmp_path, method):
    config = CONFIGS[method]
    model, _, _ = load_model(llama_dir)
    compress(model, config, progress=False)
    save_quantized(model, tmp_path / "in-memory", source_dir=llama_dir)
    compress_checkpoint(llama_dir, tmp_path / "streamed", config, progress=False)

    expected, got = tensors(tmp_path / "in-memory"), tensors(tmp_path / "streamed")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("in-memory", "streamed")]
    assert configs[0] == configs[1]
    assert configs[1]["quantization_config"]["quant_method"] == "weightkit"
    assert configs[1]["quantization_config"]["format"] == "lowrank"

    factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    name, layer = next(iter(factored.items()))
    assert got[f"{name}.weight"].tolist() == [layer.out_features, layer.in_features]  # 1-D int64 shape
    assert got[f"{name}.weight"].dtype == torch.int64
    assert got[f"{name}.weight_up"].shape == (layer.out_features, layer.rank)

    loaded = weightkit.load(tmp_path / "streamed")
    assert {n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == set(factored)
    assert torch.equal(model_output(loaded, "causal-lm"), model_output(model, "causal-lm"))


def test_minilm_round_trip_is_bit_identical(minilm, tmp_path):
    source = default_model_path()
    # One block's query, key and value: the SVDs of all 36 layers take ~5 s on one core.
    config = SVDConfig(ratio=0.4, targets=[r"re:encoder\.layer\.0\.attention\.self\..*"])
    compress_checkpoint(source, tmp_path / "svd", config, progress=False)
    model, tokenizer = copy.deepcopy(minilm[0]), minilm[1]
    compress(model, config, progress=False)
    loaded = weightkit.load(tmp_path / "svd")
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) > 0
    batch = tokenizer(
        ["Low rank factors of a sentence encoder.", "A second text."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
    assert (tmp_path / "svd" / "tokenizer.json").is_file() or (tmp_path / "svd" / "vocab.txt").is_file()


def test_transformers_refuses_the_checkpoint_instead_of_loading_random_layers(llama_dir, tmp_path):
    compress_checkpoint(llama_dir, tmp_path / "svd", CONFIGS["svd"], progress=False)
    # transformers skips the unknown quant_method with a warning; the 1-D NAME.weight then stops it.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "svd")


def test_a_bfloat16_model_keeps_its_factors_in_bfloat16(tmp_path):
    model_dir = save_tiny(tiny_llama().to(torch.bfloat16), tmp_path / "model", tiny_tokenizer(128))
    compress_checkpoint(model_dir, tmp_path / "svd", CONFIGS["svd"], progress=False)
    stored = load_file(tmp_path / "svd" / "model.safetensors")
    factors = [t for name, t in stored.items() if name.endswith(("weight_up", "weight_down"))]
    assert factors and all(t.dtype == torch.bfloat16 for t in factors)
    loaded = weightkit.load(tmp_path / "svd")
    assert next(m for m in loaded.modules() if isinstance(m, LowRankLinear)).weight_up.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "config, message",
    [
        (SVDConfig(ratio=0.01), "the smallest ratio is"),
        (SVDConfig(targets=["re:.*q_proj"], ignore=["re:.*proj"]), "no nn.Linear layer selected"),
        (WeLoreConfig(threshold=0.01), "no selected matrix loses more than"),
    ],
)
def test_bad_input_writes_nothing(llama_dir, tmp_path, config, message):
    with pytest.raises(WeightkitError, match=message):
        compress_checkpoint(llama_dir, tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_nan_weights_stop_streaming_with_nothing_written(tmp_path):
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    model_dir = save_tiny(model, tmp_path / "model", tiny_tokenizer(128))
    with pytest.raises(WeightkitError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        compress_checkpoint(model_dir, tmp_path / "out", CONFIGS["svd"], progress=False)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_factor_is_refused_by_name(llama_dir, tmp_path):
    from safetensors.torch import save_file

    compress_checkpoint(llama_dir, tmp_path / "svd", CONFIGS["svd"], progress=False)
    stored = load_file(tmp_path / "svd" / "model.safetensors")
    name = next(n for n in stored if n.endswith("weight_up"))
    stored[name] = stored[name][:, :-1].contiguous()  # rank no longer matches weight_down
    save_file(stored, tmp_path / "svd" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightkitError, match=name.replace(".", r"\.")):
        weightkit.load(tmp_path / "svd")
