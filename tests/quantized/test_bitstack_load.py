"""One BitStack artifact, any budget: a tiny Llama compressed once (streamed) loads at several budgets from
the same directory, better with more memory, never above the budget; the full budget round-trips bit for bit;
streaming equals compress + save; transformers refuses the checkpoint; bad budgets are refused by name."""

import json
import shutil

import pytest
import torch
import transformers
from sample_texts import TEXTS

import weightkit
from weightkit.checkpoint import CheckpointReader
from weightkit.compress import BitStackConfig, compress, compress_checkpoint
from weightkit.compress.quant.export import save_quantized
from weightkit.errors import WeightkitError
from weightkit.models import load_model
from weightkit.quantized.bitstack import BitStackLinear

CONFIG = BitStackConfig(iterations=6, rank=2, calib_max_length=64)
CALIBRATION = TEXTS[:16]


@pytest.fixture(scope="module")
def bitstack_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bitstack") / "model"
    return compress_checkpoint(llama_dir, out, CONFIG, data=CALIBRATION, progress=False)


@pytest.fixture(scope="module")
def reference(llama_dir):
    """The original model's logits on held-out text (texts not used for calibration)."""
    model, tokenizer, _ = load_model(llama_dir)
    batch = tokenizer(TEXTS[24:28], return_tensors="pt", padding=True, truncation=True, max_length=48)
    with torch.no_grad():
        return batch, model(**batch).logits


def _loaded_bytes(model) -> int:
    """Bytes of every tensor the loaded model saves (a tied weight once)."""
    unique = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _logits_error(model, reference) -> float:
    batch, expected = reference
    with torch.no_grad():
        got = model(**batch).logits
    return float((got - expected).square().mean() / expected.square().mean())


def _tensors(path):
    with CheckpointReader(path) as reader:
        return {name: reader.get(name) for name in reader.names()}


def test_quality_rises_with_the_budget_and_the_loaded_size_respects_it(bitstack_dir, reference):
    full = weightkit.load(bitstack_dir)
    full_bytes = _loaded_bytes(full)
    dense = sum(t.numel() * t.element_size() for n, t in full.state_dict().items() if "layers." not in n)
    budgets = [(dense + f * (full_bytes - dense)) / 1e6 for f in (0.05, 0.2, 0.4, 0.6, 0.8, 1.0)]
    sizes, errors = [], []
    for budget in budgets:
        model = weightkit.load(bitstack_dir, budget_mb=budget)
        sizes.append(_loaded_bytes(model))
        errors.append(_logits_error(model, reference))
        assert sizes[-1] <= budget * 1e6
    assert sizes[-1] == full_bytes
    assert all(a < b for a, b in zip(sizes, sizes[1:], strict=False))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.05 * errors[0]
    # The prefix is the longest that fits: the order's next block would not have.
    qc = json.loads((bitstack_dir / "config.json").read_text())["quantization_config"]
    model = weightkit.load(bitstack_dir, budget_mb=budgets[2])
    held = {n: m.weight_stack_u.shape[0] for n, m in model.named_modules() if isinstance(m, BitStackLinear)}
    seen = {n: 0 for n in held}
    for name in qc["order"]:
        seen[name] += 1
        if seen[name] > held[name]:
            nxt = model.get_submodule(name)
            out_features, in_features = nxt.out_features, nxt.in_features
            block = (out_features * in_features + 7) // 8 + 2 * 2 * 2 * (out_features + in_features)
            assert _loaded_bytes(model) + block > budgets[2] * 1e6
            break


def test_streamed_output_equals_in_memory_compress_and_save(llama_dir, bitstack_dir, tmp_path):
    model, tokenizer, _ = load_model(llama_dir)
    compress(model, CONFIG, data=CALIBRATION, tokenizer=tokenizer, progress=False)
    save_quantized(model, tmp_path / "in-memory", source_dir=llama_dir)
    expected, got = _tensors(tmp_path / "in-memory"), _tensors(bitstack_dir)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    configs = [json.loads((d / "config.json").read_text()) for d in (tmp_path / "in-memory", bitstack_dir)]
    assert configs[0] == configs[1]
    # Full budget: loading gives back exactly the in-memory model's blocks and outputs.
    loaded = weightkit.load(tmp_path / "in-memory")
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_budget_at_compress_time_stores_what_that_budget_loads(
    llama_dir, bitstack_dir, tmp_path, reference
):
    full = weightkit.load(bitstack_dir)
    budget = (_loaded_bytes(full) * 0.6) / 1e6
    capped_dir = compress_checkpoint(
        llama_dir,
        tmp_path / "capped",
        BitStackConfig(iterations=6, rank=2, calib_max_length=64, budget_mb=budget),
        data=CALIBRATION,
        progress=False,
    )
    capped = weightkit.load(capped_dir)
    assert _loaded_bytes(capped) <= budget * 1e6
    stored = sum(
        t.numel() * t.element_size() for n, t in _tensors(capped_dir).items() if "weight_shape" not in n
    )
    assert stored == _loaded_bytes(capped)
    from_full = weightkit.load(bitstack_dir, budget_mb=budget)
    for name, tensor in from_full.state_dict().items():
        assert torch.equal(capped.state_dict()[name], tensor), name
    assert _logits_error(capped, reference) == _logits_error(from_full, reference)


def test_transformers_refuses_the_checkpoint_instead_of_loading_random_layers(bitstack_dir):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(bitstack_dir)


def test_bad_budgets_are_refused_by_name(llama_dir, bitstack_dir, quantized_llama_dir, tmp_path):
    with pytest.raises(
        WeightkitError, match=r"budget_mb 0\.01 is less than the 0\.0[0-9]+ MB .* give at least"
    ):
        weightkit.load(bitstack_dir, budget_mb=0.01)
    with pytest.raises(WeightkitError, match="budget_mb must be a positive number of MB, got -1"):
        weightkit.load(bitstack_dir, budget_mb=-1)
    with pytest.raises(
        WeightkitError, match="bitstack checkpoints only; .* is compressed-tensors pack-quantized"
    ):
        weightkit.load(quantized_llama_dir, budget_mb=10)
    with pytest.raises(WeightkitError, match="bitstack checkpoints only; .* is a plain checkpoint"):
        weightkit.load(llama_dir, budget_mb=10)
    config = BitStackConfig(iterations=2, rank=2, calib_max_length=64, budget_mb=0.01)
    with pytest.raises(WeightkitError, match=r"budget_mb 0\.01 is less than the 0\.0[0-9]+ MB"):
        compress_checkpoint(llama_dir, tmp_path / "out", config, data=CALIBRATION, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_budget_counts_the_dense_tensors_in_the_dtype_they_load_in(bitstack_dir):
    full = weightkit.load(bitstack_dir)
    budget = _loaded_bytes(full) * 0.5 / 1e6
    as_float32, as_bfloat16 = (
        weightkit.load(bitstack_dir, budget_mb=budget, dtype=d) for d in (None, torch.bfloat16)
    )
    assert (
        _loaded_bytes(as_bfloat16) <= budget * 1e6
        and as_bfloat16.model.embed_tokens.weight.dtype == torch.bfloat16
    )

    def blocks(model):
        return sum(m.weight_stack_u.shape[0] for m in model.modules() if isinstance(m, BitStackLinear))

    assert blocks(as_bfloat16) > blocks(as_float32)  # the halved embeddings leave room for more blocks


def test_an_order_that_does_not_match_the_stored_blocks_is_refused(bitstack_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bitstack_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    qc = config["quantization_config"]
    dropped = qc["order"].pop()
    qc["importance"].pop()
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        WeightkitError, match=f"the order lists 5 block\\(s\\) of {dropped}, but the checkpoint stores 6"
    ):
        weightkit.load(copy)
    qc["importance"].pop()
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightkitError, match="'order' .* and 'importance' .* lists of equal length"):
        weightkit.load(copy)


def test_perplexity_importance_streams_whole_and_equals_in_memory(llama_dir, tmp_path):
    config = BitStackConfig(iterations=2, rank=2, calib_max_length=32, importance="perplexity")
    model, tokenizer, _ = load_model(llama_dir)
    compress(model, config, data=CALIBRATION[:8], tokenizer=tokenizer, progress=False)
    save_quantized(model, tmp_path / "in-memory", source_dir=llama_dir)
    streamed = compress_checkpoint(
        llama_dir, tmp_path / "streamed", config, data=CALIBRATION[:8], progress=False
    )
    expected, got = _tensors(tmp_path / "in-memory"), _tensors(streamed)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[n], t) for n, t in expected.items())
    configs = [json.loads((d / "config.json").read_text()) for d in (tmp_path / "in-memory", streamed)]
    assert configs[0]["quantization_config"] == configs[1]["quantization_config"]
