"""Tests for weightkit.merge.fisher: the Fisher-weighted merge, the Fisher itself, and the Fisher file.

References are written here: the merge entry by entry in Python floats, the Fisher as a plain loop over
examples of ``torch.autograd.grad`` squared.
"""

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from weightkit.checkpoint import CheckpointReader
from weightkit.data import calibration_texts, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.merge.fisher import (
    compute_fisher,
    fisher_checkpoint,
    fisher_merge,
    fisher_norm,
    load_fisher,
    save_fisher,
)
from weightkit.merge.linear import linear
from weightkit.testing import save_tiny, tiny_llama, tiny_tokenizer

# -- the merge -------------------------------------------------------------------------------------------


def fisher_merge_reference(tensors, fishers, weights, eps):
    """sum_i w_i max(F_i, eps) t_i / sum_i w_i max(F_i, eps), one entry at a time in Python floats."""
    flat_t = [[float(v) for v in t.reshape(-1)] for t in tensors]
    flat_f = [[float(v) for v in f.reshape(-1)] for f in fishers]
    out = []
    for j in range(len(flat_t[0])):
        num = sum(w * max(f[j], eps) * t[j] for w, f, t in zip(weights, flat_f, flat_t, strict=True))
        den = sum(w * max(f[j], eps) for w, f in zip(weights, flat_f, strict=True))
        out.append(num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(tensors[0].shape)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.3, 0.5], [3.0, 1.0, 0.0]])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_merge_matches_the_formula(weights, eps):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 6, generator=gen) for _ in weights]
    # Fishers spanning several orders of magnitude, some entries exactly 0 (below the floor).
    fishers = [torch.rand(5, 6, generator=gen) ** 4 * 10 for _ in weights]
    for f in fishers:
        f[torch.rand(5, 6, generator=gen) < 0.2] = 0.0
    got = fisher_merge(tensors, fishers, weights, eps=eps)
    assert got.dtype == torch.float32 and got.shape == (5, 6)
    expected = fisher_merge_reference(tensors, fishers, weights, eps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_equal_fishers_give_the_weighted_average():
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 4, generator=gen) for _ in range(3)]
    fisher = torch.rand(4, 4, generator=gen) + 0.1
    weights = [0.6, 0.3, 0.1]
    got = fisher_merge(tensors, [fisher, fisher.clone(), fisher.clone()], weights)
    torch.testing.assert_close(got, linear(tensors, weights), rtol=1e-5, atol=1e-6)


def test_a_model_without_fisher_on_an_entry_contributes_nothing_there():
    a, b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5.0, 5.0, 5.0])
    fisher_a = torch.tensor([0.0, 1.0, 2.0])
    fisher_b = torch.tensor([3.0, 1.0, 0.0])
    got = fisher_merge([a, b], [fisher_a, fisher_b], [0.5, 0.5])
    # Entry 0: only b has Fisher mass, entry 2: only a; entry 1: equal masses, the plain average.
    torch.testing.assert_close(got, torch.tensor([5.0, 3.0, 1.0]), rtol=1e-5, atol=1e-5)
    # Exactly: a keeps the floor's say, 5 - 4 * 1e-6 / (3 + 1e-6), as in the reference code.
    expected = fisher_merge_reference([a, b], [fisher_a, fisher_b], [0.5, 0.5], 1e-6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_entries_without_any_fisher_fall_back_to_the_weighted_average():
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(3, 3, generator=gen) for _ in range(2)]
    zeros = [torch.zeros(3, 3), torch.zeros(3, 3)]
    expected = linear(tensors, [0.25, 0.75])
    torch.testing.assert_close(fisher_merge(tensors, zeros, [0.25, 0.75]), expected, rtol=1e-6, atol=1e-6)
    # eps = 0: no floor, but an entry with no mass at all still gets the weighted average, not 0/0.
    fishers = [torch.zeros(3, 3), torch.zeros(3, 3)]
    fishers[0][0, 0] = 1.0
    got = fisher_merge(tensors, fishers, [0.25, 0.75], eps=0.0)
    assert torch.isfinite(got).all()
    assert float(got[0, 0]) == float(tensors[0][0, 0])
    torch.testing.assert_close(got[1:], expected[1:], rtol=1e-6, atol=1e-6)


def test_merge_keeps_dtype_and_does_not_modify_inputs():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(8, generator=gen).to(torch.bfloat16) for _ in range(2)]
    fishers = [torch.rand(8, generator=gen) for _ in range(2)]
    copies = [t.clone() for t in tensors + fishers]
    got = fisher_merge(tensors, fishers, [1.0, 1.0])
    assert got.dtype == torch.bfloat16
    expected = fisher_merge_reference([t.float() for t in tensors], fishers, [1.0, 1.0], 1e-6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2, atol=1e-2)
    assert all(torch.equal(t, c) for t, c in zip(tensors + fishers, copies, strict=True))


def test_merge_errors_name_the_problem():
    t = [torch.zeros(2, 2), torch.zeros(2, 2)]
    f = [torch.ones(2, 2), torch.ones(2, 2)]
    with pytest.raises(WeightkitError, match="at least one tensor"):
        fisher_merge([], [], [])
    with pytest.raises(WeightkitError, match="2 tensors but 1 Fishers"):
        fisher_merge(t, f[:1], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="2 tensors but 3 weights"):
        fisher_merge(t, f, [1.0, 1.0, 1.0])
    with pytest.raises(WeightkitError, match="Fisher 1 has shape"):
        fisher_merge(t, [f[0], torch.ones(3)], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="tensor 1 has shape"):
        fisher_merge([t[0], torch.zeros(4)], f, [1.0, 1.0])
    with pytest.raises(WeightkitError, match="Fisher 0 has negative"):
        fisher_merge(t, [-f[0], f[1]], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="Fisher 1 contains 1 NaN"):
        fisher_merge(t, [f[0], torch.tensor([[1.0, float("nan")], [1.0, 1.0]])], [1.0, 1.0])
    with pytest.raises(WeightkitError, match="weight 0 is -1.0"):
        fisher_merge(t, f, [-1.0, 2.0])
    with pytest.raises(WeightkitError, match="sum to zero"):
        fisher_merge(t, f, [0.0, 0.0])
    with pytest.raises(WeightkitError, match="eps"):
        fisher_merge(t, f, [1.0, 1.0], eps=-1.0)


def test_fisher_norm_of_dict_and_file_agree(tmp_path):
    fisher = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    assert fisher_norm(fisher) == 5.0
    path = save_fisher(fisher, tmp_path / "f.safetensors")
    assert fisher_norm(path) == 5.0


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


# -- the Fisher file -------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    shared = torch.rand(4, 3)
    fisher = {"a.weight": shared, "b.weight": shared, "c.bias": torch.zeros(5, dtype=torch.float64)}
    path = save_fisher(fisher, tmp_path / "sub" / "fisher.safetensors", metadata={"examples": 12})
    tensors, metadata = load_fisher(path)
    assert set(tensors) == set(fisher)
    assert all(torch.equal(tensors[n], fisher[n]) and tensors[n].dtype == fisher[n].dtype for n in fisher)
    assert metadata["weightkit"] == "fisher" and metadata["examples"] == "12" and metadata["format"] == "pt"
    assert [p.name for p in path.parent.iterdir()] == ["fisher.safetensors"]  # no temporary file left
    with pytest.raises(WeightkitError, match="exists; pass --force"):
        save_fisher(fisher, path)
    save_fisher({"x": torch.ones(1)}, path, overwrite=True)
    assert set(load_fisher(path)[0]) == {"x"}


def test_save_and_load_refuse_bad_input(tmp_path):
    with pytest.raises(WeightkitError, match=r"\.safetensors"):
        save_fisher({"a": torch.ones(1)}, tmp_path / "f.bin")
    with pytest.raises(WeightkitError, match="empty"):
        save_fisher({}, tmp_path / "f.safetensors")
    with pytest.raises(WeightkitError, match="Fisher of a has negative"):
        save_fisher({"a": torch.tensor([-1.0])}, tmp_path / "f.safetensors")
    with pytest.raises(WeightkitError, match="Fisher of b contains 1 NaN"):
        save_fisher({"a": torch.ones(1), "b": torch.tensor([float("nan")])}, tmp_path / "f.safetensors")
    with pytest.raises(WeightkitError, match="not a floating-point"):
        save_fisher({"a": torch.ones(1, dtype=torch.long)}, tmp_path / "f.safetensors")
    assert not list(tmp_path.iterdir())
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(WeightkitError, match="not a weightkit Fisher file"):
        load_fisher(tmp_path / "plain.safetensors")


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


# -- the paper's claim, on a small case ------------------------------------------------------------------


def _task(features: slice, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary logistic-regression data that lives on a subset of the 10 features (the rest are 0)."""
    x = torch.zeros(n, 10)
    x[:, features] = torch.randn(n, features.stop - features.start, generator=gen)
    true_w = torch.randn(features.stop - features.start, generator=gen)
    y = (x[:, features] @ true_w > 0).long()
    return x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_fisher_merging_beats_plain_averaging_on_the_union_of_tasks():
    gen = torch.Generator().manual_seed(0)
    xa, ya = _task(slice(0, 5), 256, gen)
    xb, yb = _task(slice(5, 10), 256, gen)
    torch.manual_seed(0)
    init = nn.Linear(10, 2)
    model_a = nn.Linear(10, 2)
    model_a.load_state_dict(init.state_dict())  # both fine-tunes start from one initialisation
    model_a = _train(model_a, xa, ya)
    model_b = nn.Linear(10, 2)
    model_b.load_state_dict(init.state_dict())
    model_b = _train(model_b, xb, yb)

    fisher_a = compute_fisher(model_a, [xa], mode="exact", progress=False)
    fisher_b = compute_fisher(model_b, [xb], mode="exact", progress=False)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    fisher_state = {
        n: fisher_merge([state_a[n], state_b[n]], [fisher_a[n], fisher_b[n]], [0.5, 0.5]) for n in state_a
    }
    average_state = {n: linear([state_a[n], state_b[n]], [0.5, 0.5]) for n in state_a}

    x, y = torch.cat([xa, xb]), torch.cat([ya, yb])

    def union_loss(state):
        merged = nn.Linear(10, 2)
        merged.load_state_dict(state)
        with torch.no_grad():
            return float(nn.functional.cross_entropy(merged(x), y))

    loss_a, loss_b = union_loss(state_a), union_loss(state_b)
    fisher_loss, average_loss = union_loss(fisher_state), union_loss(average_state)
    assert fisher_loss < 0.8 * average_loss, (fisher_loss, average_loss)
    assert fisher_loss < min(loss_a, loss_b)
    assert math.isfinite(fisher_loss)
