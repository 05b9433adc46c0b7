"""Tests for weightkit.merge.fisher_compute: the Fisher against a plain loop over examples of
``torch.autograd.grad`` squared, for a classifier and a causal LM, and ``fisher_checkpoint``."""

import pytest
import torch
from safetensors import safe_open
from torch import nn

from weightkit.checkpoint import CheckpointReader
from weightkit.data import calibration_texts, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.merge.fisher_compute import compute_fisher, fisher_checkpoint
from weightkit.merge.fisher_file import load_fisher
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

# -- computing the Fisher: a classifier ------------------------------------------------------------------


def mlp(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, classes))


def classifier_reference(model, x, mode, labels=None, seed=0):
    """Mean over examples of squared per-example gradients of log p(y|x), one example at a time."""
    params = dict(model.named_parameters())
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    for i in range(x.shape[0]):
        log_probs = torch.log_softmax(model(x[i : i + 1])[0], dim=-1)
        probs = log_probs.detach().exp()
        if mode == "exact":
            classes = [(c, float(probs[c])) for c in range(len(probs))]
        elif mode == "sample":
            classes = [(int(torch.multinomial(probs[None], 1, generator=gen)), 1.0)]
        else:
            classes = [(int(labels[i]), 1.0)]
        for c, weight in classes:
            grads = torch.autograd.grad(log_probs[c], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                out[name] += weight * g**2
    return {name: f / x.shape[0] for name, f in out.items()}


@pytest.mark.parametrize("mode", ["exact", "sample", "empirical"])
def test_classifier_fisher_matches_per_example_loop(mode):
    model = mlp()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 10, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # split across batches: still one example at a time
    got = compute_fisher(model, batches, mode=mode, seed=7, progress=False)
    expected = classifier_reference(model, x, mode, labels=y, seed=7)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-9)


def test_sampled_fisher_estimates_the_exact_one():
    model = mlp(seed=1)
    x = torch.randn(30, 10, generator=torch.Generator().manual_seed(5))
    exact = compute_fisher(model, [x], mode="exact", progress=False)
    sampled = compute_fisher(model, [x.repeat(20, 1)], mode="sample", seed=0, progress=False)
    for name in exact:
        rel = float((sampled[name] - exact[name]).norm() / exact[name].norm())
        assert rel < 0.15, name
    # The squared gradient of the batch-summed log-likelihood is not the Fisher: it mixes examples.
    params = list(model.parameters())
    total = torch.log_softmax(model(x), dim=-1).max(dim=-1).values.sum()
    batch_sq = [g**2 / len(x) for g in torch.autograd.grad(total, params)]
    assert not torch.allclose(batch_sq[0], exact["0.weight"], rtol=0.5)


def test_fisher_is_deterministic_and_leaves_the_model_as_it_was():
    model = mlp(seed=2)
    model.train()
    model[0].weight.requires_grad_(False)  # frozen parameters still get a Fisher
    model[2].weight.grad = torch.full_like(model[2].weight, 7.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(6))
    a = compute_fisher(model, [x], seed=3, progress=False)
    b = compute_fisher(model, iter([x]), seed=3, progress=False)  # a generator works too
    c = compute_fisher(model, [x], seed=4, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert float(a["0.weight"].sum()) > 0
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert torch.equal(model[2].weight.grad, torch.full_like(model[2].weight, 7.0))
    assert model[0].weight.grad is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fisher_errors():
    model = mlp()
    x = torch.randn(2, 10)
    with pytest.raises(WeightkitError, match="unknown Fisher mode"):
        compute_fisher(model, [x], mode="true", progress=False)
    with pytest.raises(WeightkitError, match="needs labels"):
        compute_fisher(model, [x], mode="empirical", progress=False)
    with pytest.raises(WeightkitError, match="batch sizes"):
        compute_fisher(model, [{"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}], progress=False)
    with pytest.raises(WeightkitError, match="cannot read labels from logits"):
        compute_fisher(nn.Linear(10, 4), [torch.randn(2, 5, 10)], progress=False)
    llama = tiny_llama(seed=0)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(WeightkitError, match="only offered for classifiers"):
        compute_fisher(llama, [{"input_ids": ids}], mode="exact", progress=False)
    with pytest.raises(WeightkitError, match="two or more tokens"):
        compute_fisher(llama, [{"input_ids": ids[:, :1]}], progress=False)


# -- computing the Fisher: a causal LM -------------------------------------------------------------------


def causal_lm_reference(model, sequences, mode, seed=0):
    """Per sequence: d/dtheta sum_t log p(y_t | x_<=t), squared, averaged over sequences.

    ``y_t`` is the real next token (empirical) or drawn from the model (sample) with the documented
    protocol: one CPU generator, ``torch.multinomial`` over each sequence's [positions, vocab] rows.
    """
    params = dict(model.named_parameters())
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    for ids in sequences:
        ids = ids[None]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
        if mode == "sample":
            targets = torch.multinomial(log_probs.detach().exp(), 1, generator=gen).squeeze(1)
        else:
            targets = ids[0, 1:]
        log_likelihood = log_probs.gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(log_likelihood, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                out[name] += g**2
    return {name: f / len(sequences) for name, f in out.items()}


@pytest.mark.parametrize("mode", ["sample", "empirical"])
def test_causal_lm_fisher_matches_per_sequence_loop(mode):
    model = tiny_llama(seed=0)
    gen = torch.Generator().manual_seed(8)
    lengths = [9, 5, 7, 1]  # the one-token text has nothing to predict: skipped and not counted
    sequences = [torch.randint(0, 128, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, ids in enumerate(sequences):  # right padding, as weightkit.data.tokenize_batches does
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    batches = [
        {"input_ids": input_ids[:2], "attention_mask": attention_mask[:2]},
        {"input_ids": input_ids[2:], "attention_mask": attention_mask[2:]},
    ]
    got = compute_fisher(model, batches, mode=mode, seed=11, progress=False)
    expected = causal_lm_reference(model, sequences[:3], mode, seed=11)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-10)


def test_causal_lm_labels_minus_100_are_left_out():
    model = tiny_llama(seed=0)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[0, 5:] = -100
    got = compute_fisher(model, [{"input_ids": ids, "labels": labels}], mode="empirical", progress=False)
    # Only targets 1..4 count: the same as scoring the first five tokens alone.
    expected = causal_lm_reference(model, [ids[0, :5]], "empirical")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-10)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    return save_tiny(model, tmp_path_factory.mktemp("tied") / "model", tiny_tokenizer(128))


@pytest.mark.parametrize("tied", [False, True])
def test_fisher_checkpoint_names_match_the_checkpoint(tmp_path, llama_dir, tied_llama_dir, tied):
    model_dir = tied_llama_dir if tied else llama_dir
    out = fisher_checkpoint(
        model_dir, None, tmp_path / "fisher.safetensors", samples=6, max_length=24, seed=1, progress=False
    )
    with CheckpointReader(model_dir) as reader:
        ckpt_names = set(reader.names())
        shapes = {n: reader.shape(n) for n in ckpt_names}
    with safe_open(out, framework="pt") as f:
        names, metadata = set(f.keys()), f.metadata()
    assert names == ckpt_names
    assert ("lm_head.weight" in names) is not tied
    assert metadata["weightkit"] == "fisher" and metadata["unit"] == "sequence"
    assert metadata["mode"] == "sample" and metadata["examples"] == "6"
    tensors, _ = load_fisher(out)
    assert all(tuple(tensors[n].shape) == shapes[n] and tensors[n].dtype == torch.float32 for n in names)
    assert all(float(t.min()) >= 0 for t in tensors.values())
    assert float(tensors["model.embed_tokens.weight"].sum()) > 0


def test_fisher_checkpoint_equals_compute_fisher_and_is_deterministic(tmp_path, llama_dir, text_file):
    kwargs = dict(samples=5, max_length=16, seed=3, progress=False)
    a = fisher_checkpoint(llama_dir, text_file, tmp_path / "a.safetensors", **kwargs)
    b = fisher_checkpoint(llama_dir, text_file, tmp_path / "b.safetensors", **kwargs)
    (tensors_a, meta_a), (tensors_b, meta_b) = load_fisher(a), load_fisher(b)
    assert meta_a == meta_b and set(tensors_a) == set(tensors_b)
    assert all(torch.equal(tensors_a[n], tensors_b[n]) for n in tensors_a)  # bit-identical

    from weightkit.models import load_model

    model, tokenizer, _ = load_model(llama_dir)
    texts = calibration_texts(text_file, 5, seed=3)
    batches = tokenize_batches(tokenizer, texts, max_length=16, batch_size=8)
    expected = compute_fisher(model, batches, seed=3, progress=False)
    assert meta_a["examples"] == "5"
    assert all(torch.equal(tensors_a[n], expected[n]) for n in expected)


def test_fisher_checkpoint_errors(tmp_path, bert_dir, llama_dir):
    with pytest.raises(WeightkitError, match="only causal LMs"):
        fisher_checkpoint(bert_dir, None, tmp_path / "f.safetensors", samples=2, progress=False)
    with pytest.raises(WeightkitError):
        fisher_checkpoint(tmp_path / "missing", None, tmp_path / "f.safetensors", progress=False)
    with pytest.raises(WeightkitError, match="must be 'sample' or 'empirical'"):
        fisher_checkpoint(llama_dir, None, tmp_path / "f.safetensors", mode="exact", progress=False)
    with pytest.raises(WeightkitError, match=r"\.safetensors"):
        fisher_checkpoint(llama_dir, None, tmp_path / "f.pt", progress=False)
    (tmp_path / "exists.safetensors").write_bytes(b"")
    with pytest.raises(WeightkitError, match="exists; pass --force"):
        fisher_checkpoint(llama_dir, None, tmp_path / "exists.safetensors", progress=False)
    assert not (tmp_path / "f.safetensors").exists()


class _Stop(Exception):
    """Raised by a spy once it has seen what it looks for."""


@pytest.mark.parametrize(
    ("device", "where"), [("meta", "meta"), (None, "cuda" if torch.cuda.is_available() else "cpu")]
)
def test_fisher_checkpoint_runs_the_model_on_the_device_asked(
    tmp_path, llama_dir, text_file, monkeypatch, device, where
):
    import weightkit.merge.fisher_compute as fisher_compute

    seen = []

    def spy(model, batches, **kwargs):
        seen.append(next(model.parameters()).device.type)
        raise _Stop

    monkeypatch.setattr(fisher_compute, "_accumulate_fisher", spy)
    with pytest.raises(_Stop):
        fisher_checkpoint(
            llama_dir, text_file, tmp_path / "f.safetensors", samples=2, device=device, progress=False
        )
    assert seen == [where]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a missing GPU")
def test_fisher_checkpoint_refuses_a_missing_device_before_loading(tmp_path, llama_dir, text_file):
    with pytest.raises(WeightkitError, match="--device cuda: this machine has no CUDA GPU"):
        fisher_checkpoint(llama_dir, text_file, tmp_path / "f.safetensors", device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fisher_checkpoint_on_cuda_is_close_to_the_cpu(tmp_path, llama_dir, text_file):
    kwargs = dict(samples=3, max_length=16, seed=1, progress=False)
    gpu = load_fisher(
        fisher_checkpoint(llama_dir, text_file, tmp_path / "g.safetensors", device="cuda", **kwargs)
    )[0]
    cpu = load_fisher(
        fisher_checkpoint(llama_dir, text_file, tmp_path / "c.safetensors", device="cpu", **kwargs)
    )[0]
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-7)
