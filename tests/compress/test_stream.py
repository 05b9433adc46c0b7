"""Streamed checkpoint-to-checkpoint compression equals compress + save_quantized, holding one block."""

import json

import pytest
import torch
from sample_texts import TEXTS

from weightkit.checkpoint import CheckpointReader
from weightkit.compress import AWQConfig, GPTQConfig, RTNConfig, compress
from weightkit.compress import stream as stream_module
from weightkit.compress.quant.export import save_quantized
from weightkit.compress.stream import compress_checkpoint
from weightkit.errors import WeightkitError
from weightkit.models import load_model
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

CONFIGS = {
    "rtn": RTNConfig(bits=4, group_size=16, symmetric=False),
    "gptq": GPTQConfig(bits=4, group_size=16, calib_max_length=64),
    "awq": AWQConfig(bits=3, group_size=16, calib_max_length=64),
}


def _tensors(path):
    with CheckpointReader(path) as reader:
        return {name: reader.get(name) for name in reader.names()}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("model_dir", ["llama_dir", "bert_dir"])
def test_streamed_output_equals_in_memory_compress_and_save(request, tmp_path, method, model_dir):
    model_dir = request.getfixturevalue(model_dir)
    config = CONFIGS[method]
    model, tokenizer, _ = load_model(model_dir)
    compress(model, config, data=TEXTS[:16], tokenizer=tokenizer, progress=False)
    save_quantized(model, tmp_path / "in-memory", source_dir=model_dir)
    compress_checkpoint(model_dir, tmp_path / "streamed", config, data=TEXTS[:16], progress=False)

    expected, got = _tensors(tmp_path / "in-memory"), _tensors(tmp_path / "streamed")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    config_of = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("in-memory", "streamed")]
    assert config_of[0] == config_of[1]
    files = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("in-memory", "streamed")]
    # The streamed output's model card and manifest name the compress config and the input, which a model
    # in memory does not carry.
    own = ("README.md", "weightkit_manifest.json")
    assert files[0] == [f for f in files[1] if f not in own] and set(own) <= set(files[1])
    card = (tmp_path / "streamed" / "README.md").read_text()
    assert f"`weightkit compress`, method `{method}`" in card and str(model_dir) in card


def test_blocks_are_read_one_at_a_time_and_freed(tmp_path, monkeypatch):
    model_dir = save_tiny(tiny_llama(seed=0, num_hidden_layers=4), tmp_path / "model", tiny_tokenizer(128))
    live_blocks = []
    original_load = stream_module._StreamedModel.load

    def load(self, prefix, module, **kwargs):
        original_load(self, prefix, module, **kwargs)
        blocks = self.model.model.layers
        live_blocks.append(sum(any(not p.is_meta for p in b.parameters()) for b in blocks))

    monkeypatch.setattr(stream_module._StreamedModel, "load", load)
    compress_checkpoint(model_dir, tmp_path / "out", CONFIGS["gptq"], data=TEXTS[:8], progress=False)
    # First the tensors outside the blocks (no block), then each block alone.
    assert live_blocks == [0, 1, 1, 1, 1]


def test_nan_weight_stops_streaming_with_nothing_written(tmp_path):
    model = tiny_llama(seed=0)
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    model_dir = save_tiny(model, tmp_path / "model", tiny_tokenizer(128))
    for method in ("rtn", "gptq"):
        with pytest.raises(WeightkitError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
            compress_checkpoint(model_dir, tmp_path / "out", CONFIGS[method], data=TEXTS[:8], progress=False)
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_tied_embeddings_quantize_with_every_method_and_load_in_transformers(tmp_path, method):
    import transformers

    model = tiny_llama(seed=0, tie_word_embeddings=True)
    model_dir = save_tiny(model, tmp_path / "model", tiny_tokenizer(128))
    config = {
        "rtn": RTNConfig(bits=4, group_size=16),
        "gptq": GPTQConfig(bits=4, group_size=16, calib_max_length=64),
        "awq": AWQConfig(bits=4, group_size=16, calib_max_length=64),
    }[method]
    out = compress_checkpoint(model_dir, tmp_path / "out", config, data=TEXTS[:16], progress=False)

    with CheckpointReader(out) as reader:
        assert "model.embed_tokens.weight" in reader and "lm_head.weight" not in reader
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    reference, tokenizer, _ = load_model(model_dir)
    compress(reference, config, data=TEXTS[:16], tokenizer=tokenizer, progress=False)
    ids = torch.tensor([[1, 5, 17, 33, 64, 99, 127, 3, 8, 21, 40, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_streamed_rtn_rounds_each_weight_on_the_device(tmp_path, monkeypatch, llama_dir):
    from weightkit.compress.quant import rtn as rtn_module
    from weightkit.quantized.grid import rtn_quantize

    placements = []

    def record(w, scheme, **kwargs):
        placements.append(w.device.type)
        return rtn_quantize(torch.zeros(w.shape), scheme, **kwargs)  # meta holds no values to round

    # RTNConfig.quantize_weight rounds each weight the stream reads (rtn_quantize looked up in its module)
    monkeypatch.setattr(rtn_module, "rtn_quantize", record)
    compress_checkpoint(llama_dir, tmp_path / "out", CONFIGS["rtn"], progress=False, device="meta")
    assert placements == ["meta"] * 14


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streamed_calibration_runs_on_the_device(tmp_path, monkeypatch, llama_dir, method):
    from weightkit.compress.quant import calibrated

    class Seen(Exception):
        pass

    def record(model, block, batches, device):
        raise Seen(device)

    monkeypatch.setattr(calibrated, "capture_block_inputs", record)
    with pytest.raises(Seen) as seen:
        compress_checkpoint(llama_dir, tmp_path / "out", CONFIGS[method], data=TEXTS[:8], device="meta")
    assert seen.value.args == (torch.device("meta"),)
    assert not (tmp_path / "out").exists()


def test_a_device_this_machine_lacks_is_refused_before_anything_is_read(tmp_path, llama_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(WeightkitError, match="no CUDA GPU"):
        compress_checkpoint(llama_dir, tmp_path / "out", CONFIGS["rtn"], device="cuda")
    assert not (tmp_path / "out").exists()
