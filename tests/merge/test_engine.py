"""The merge engine: planning checks, tied embeddings, added vocabulary rows, streaming output."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightkit.errors import WeightkitError
from weightkit.merge.engine import WorkBuffers, plan_merge, prepare_merge, read_job, run_merge
from weightkit.registry import config_from_dict
from weightkit.testing import save_tiny, tiny_bert, tiny_llama


def mean(_name, tensors):
    return sum(tensors) / len(tensors)


def _weights(directory):
    return load_file(directory / "model.safetensors")


def test_merging_a_model_with_itself_returns_it(tmp_path):
    a = save_tiny(tiny_llama(seed=1, tie_word_embeddings=False), tmp_path / "a")
    b = save_tiny(tiny_llama(seed=1, tie_word_embeddings=False), tmp_path / "b")
    summary = run_merge(plan_merge(None, [a, b]), mean, tmp_path / "out", progress=False)
    merged, original = _weights(tmp_path / "out"), _weights(a)
    assert merged.keys() == original.keys() and summary["tensors"] == len(original)
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)
    assert (tmp_path / "out" / "config.json").is_file()


def test_average_of_two_models_is_their_mean_in_the_requested_dtype(tmp_path):
    a = save_tiny(tiny_llama(seed=1), tmp_path / "a")
    b = save_tiny(tiny_llama(seed=2), tmp_path / "b")
    run_merge(plan_merge(None, [a, b]), mean, tmp_path / "out", dtype=torch.bfloat16, progress=False)
    merged, wa, wb = _weights(tmp_path / "out"), _weights(a), _weights(b)
    for name in wa:
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name], ((wa[name] + wb[name]) / 2).bfloat16())


def test_a_tied_model_contributes_its_embedding_as_lm_head(tmp_path):
    untied = save_tiny(tiny_llama(seed=1, tie_word_embeddings=False), tmp_path / "untied")
    tied = save_tiny(tiny_llama(seed=2, tie_word_embeddings=True), tmp_path / "tied")
    assert "lm_head.weight" not in _weights(tied)
    run_merge(plan_merge(untied, [tied]), mean, tmp_path / "out", progress=False)
    merged, wu, wt = _weights(tmp_path / "out"), _weights(untied), _weights(tied)
    expected = (wu["lm_head.weight"] + wt["model.embed_tokens.weight"]) / 2
    torch.testing.assert_close(merged["lm_head.weight"], expected)
    # With the tied model as the reference, the output is tied too: no lm_head stored.
    run_merge(plan_merge(tied, [untied]), mean, tmp_path / "out2", progress=False)
    assert "lm_head.weight" not in _weights(tmp_path / "out2")


def test_added_vocabulary_rows_come_from_the_reference_model(tmp_path):
    small = save_tiny(tiny_llama(seed=1, vocab_size=128), tmp_path / "small")
    large = save_tiny(tiny_llama(seed=2, vocab_size=130), tmp_path / "large")
    run_merge(plan_merge(large, [small]), mean, tmp_path / "out", progress=False)
    merged, ws, wl = _weights(tmp_path / "out"), _weights(small), _weights(large)
    embed = "model.embed_tokens.weight"
    assert merged[embed].shape == (130, 32)
    torch.testing.assert_close(merged[embed][:128], (ws[embed] + wl[embed][:128]) / 2)
    torch.testing.assert_close(merged[embed][128:], wl[embed][128:])


def test_plan_refuses_other_architectures_missing_tensors_and_shapes(tmp_path):
    llama = save_tiny(tiny_llama(seed=1), tmp_path / "llama")
    with pytest.raises(WeightkitError, match="different architectures"):
        plan_merge(llama, [save_tiny(tiny_bert(seed=1), tmp_path / "bert")])
    weights = _weights(llama)
    dropped = tmp_path / "dropped"
    save_tiny(tiny_llama(seed=1), dropped)
    save_file(
        {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, dropped / "model.safetensors"
    )
    with pytest.raises(
        WeightkitError, match=r"model.layers.1.mlp.up_proj.weight is in .* missing from .*dropped"
    ):
        plan_merge(llama, [dropped])
    wider = save_tiny(tiny_llama(seed=1, intermediate_size=48), tmp_path / "wider")
    with pytest.raises(
        WeightkitError, match=r"mlp\.\w+_proj\.weight has different shapes \(.*llama: \[.*wider: \["
    ):
        plan_merge(llama, [wider])
    with pytest.raises(WeightkitError, match="at least one model"):
        plan_merge(None, [])
    # One checkpoint is a plan (passthrough copies it); how many models a method needs, its config says.
    with pytest.raises(
        WeightkitError, match=r"ties merges at least 1 model\(s\) besides the base model, got 0"
    ):
        prepare_merge(llama, [llama], config_from_dict("merge", {"method": "ties"}))


def test_nan_in_an_input_stops_the_merge_and_writes_nothing(tmp_path):
    a = save_tiny(tiny_llama(seed=1), tmp_path / "a")
    b = save_tiny(tiny_llama(seed=2), tmp_path / "b")
    weights = _weights(b)
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, b / "model.safetensors")
    message = r"model.layers.0.self_attn.q_proj.weight of .*b contains 1 NaN/Inf values \(1 NaN"
    with pytest.raises(WeightkitError, match=message):
        run_merge(plan_merge(a, [b]), mean, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary directory left either


def test_a_merged_tensor_that_is_a_read_buffer_is_copied_before_the_next_read(tmp_path):
    # The inputs are reused buffers: a method returning one of them (kept as is in float32) must not see
    # every tensor of the output overwritten by the next read.
    a = save_tiny(tiny_llama(seed=1), tmp_path / "a")
    b = save_tiny(tiny_llama(seed=2), tmp_path / "b")
    seen = []

    def second(_name, tensors):
        seen.append(tensors[1].data_ptr())
        return tensors[1]

    run_merge(plan_merge(a, [b]), second, tmp_path / "out", dtype=torch.float32, progress=False)
    merged, wb = _weights(tmp_path / "out"), _weights(b)
    for name, tensor in wb.items():
        torch.testing.assert_close(merged[name], tensor.float(), rtol=0, atol=0)
    assert len(set(seen)) == 1  # one buffer per model, reused for every tensor


def test_read_job_gives_float32_views_of_the_reused_buffers(tmp_path):
    a = save_tiny(tiny_llama(seed=1).to(torch.bfloat16), tmp_path / "a")
    b = save_tiny(tiny_llama(seed=2).to(torch.bfloat16), tmp_path / "b")
    plan = plan_merge(a, [b])
    buffers = WorkBuffers()
    try:
        for job in plan.jobs:
            tensors = read_job(plan, job, buffers)
            expected = [r.get(s).float() for r, s in zip(plan.readers, job.sources, strict=True)]
            assert all(buffers.holds(t) and t.dtype == torch.float32 for t in tensors)
            assert all(torch.equal(t, e) for t, e in zip(tensors, expected, strict=True))
    finally:
        for reader in plan.readers:
            reader.close()
