"""weightkit.cli.inspect_extras, the inspect glue that trains, aligns and differentiates, on tiny models."""

import json
import math

import pytest
import torch
from permutations import loaded_copy, random_perms, shapes_of
from sample_texts import TEXTS
from transformers import BertForSequenceClassification

from weightkit.cli.inspect_extras import barrier_run, hessian_run, intrinsic_dimension_run, mean_loss
from weightkit.errors import WeightkitError
from weightkit.merge.align import transformer_spec
from weightkit.merge.rebasin import apply_permutation
from weightkit.models import load_model
from weightkit.runtime.training import TrainConfig, make_batches
from weightkit.testing import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n\n".join(TEXTS[:8]))
    return path


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny Llama fitted to the texts (a random one predicts near-uniformly, and so does any mix of its
    weights: no barrier to see) and a copy with its heads and MLP neurons randomly permuted (the same
    function)."""
    root = tmp_path_factory.mktemp("pair")
    model = tiny_llama(seed=0)
    tokenizer = tiny_tokenizer(128)
    batches = make_batches(tokenizer, TEXTS[:8], None, batch_size=8, max_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    spec = transformer_spec(model.config.to_dict(), shapes_of(model))
    permuted = loaded_copy(model, apply_permutation(model.state_dict(), spec, random_perms(spec, seed=3)))
    return save_tiny(model, root / "a", tokenizer), save_tiny(permuted, root / "b", tokenizer)


def test_the_barrier_between_a_checkpoint_and_itself_is_zero(llama_pair, texts_file):
    a, _ = llama_pair
    result = barrier_run(a, a, texts_file, align=False, device="cpu", points=5)
    assert result["before"].barrier == 0.0 and result["after"] is None
    assert len(set(result["before"].losses)) == 1


def test_alignment_brings_the_barrier_to_a_permuted_copy_down_to_zero(llama_pair, texts_file):
    a, b = llama_pair
    result = barrier_run(a, b, texts_file, align=True, device="cpu", points=5)
    before, after = result["before"], result["after"]
    # The ends compute the same function, so their losses agree; the midpoint of unaligned weights does not.
    assert before.losses[0] == pytest.approx(before.losses[-1], rel=1e-5)
    assert before.barrier > 1e-3
    assert after.barrier <= before.barrier and after.barrier == pytest.approx(0.0, abs=1e-5)
    assert result["alignment"]["layers"][0]["mlp_moved"] > 0


def test_the_barrier_loss_is_the_token_weighted_causal_lm_loss(llama_pair, texts_file):
    a, _ = llama_pair
    model, _, _ = load_model(a)
    batches = make_batches(tiny_tokenizer(128), TEXTS[:8], None, batch_size=3, max_length=128)
    with torch.no_grad():
        nll, tokens = 0.0, 0
        for batch in batches:  # a plain reference: summed next-token NLL over the real tokens
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            flat_logits, flat_targets = logits[:, :-1].reshape(-1, 128), targets.reshape(-1)
            nll += float(torch.nn.functional.cross_entropy(flat_logits, flat_targets, reduction="sum"))
            tokens += int((targets != -100).sum())
        assert float(mean_loss(model, batches)) == pytest.approx(nll / tokens, rel=1e-5)
    result = barrier_run(a, a, texts_file, align=False, device="cpu", points=2, batch_size=3)
    assert result["before"].losses[0] == pytest.approx(nll / tokens, rel=1e-5)


def test_hessian_run_gives_the_top_eigenvalues_and_a_density(llama_pair, texts_file):
    a, _ = llama_pair
    result = hessian_run(a, texts_file, k=3, device="cpu", examples=2, iterations=12, probes=2)
    top = result["eigenvalues"]
    assert len(top) == 3 and top[0] >= top[1] >= top[2] and top[0] > 0
    xs, ys = zip(*result["density"], strict=True)
    assert sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1)) == pytest.approx(
        1, abs=1e-4
    )
    assert min(xs) < top[0] < max(xs)
    assert result["parameters"] == sum(p.numel() for p in tiny_llama().parameters())
    assert math.isfinite(result["loss"]) and result["examples"] == 2


def test_a_bare_encoder_has_no_loss_to_inspect(tmp_path, texts_file):
    path = save_tiny(tiny_bert(), tmp_path / "bert", tiny_tokenizer(128, kind="encoder"))
    with pytest.raises(WeightkitError, match="without a loss of its own"):
        hessian_run(path, texts_file, device="cpu")


# -- intrinsic dimension ---------------------------------------------------------------------------------

_POSITIVE = ["the quick brown fox jumps", "the fox sleeps in the sun", "a quick fox by the river"]
_NEGATIVE = ["weights of a neural network", "quantization keeps the matrix", "an adapter adds a layer"]


@pytest.fixture(scope="module")
def classification_files(tmp_path_factory):
    """A tiny BERT encoder pre-trained to tell the two kinds of sentence apart (saved bare, as a fine-tune
    starts from: the classification head is new), and train/eval files of the task. A randomly initialised
    encoder gives every sentence nearly the same features, so no small subspace could learn the task."""
    root = tmp_path_factory.mktemp("cls")
    records = [{"text": t, "label": "fox"} for t in _POSITIVE] + [
        {"text": t, "label": "nn"} for t in _NEGATIVE
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records * 4))
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in records * 2))
    tokenizer = tiny_tokenizer(128, kind="encoder")
    torch.manual_seed(0)
    classifier = BertForSequenceClassification(tiny_bert().config)
    labels = [int(r["label"] == "fox") for r in records]
    batch = make_batches(tokenizer, [r["text"] for r in records], labels, batch_size=6, max_length=16)[0]
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-2)
    for _ in range(20):
        classifier(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bert = save_tiny(classifier.bert.eval(), root / "bert", tokenizer)
    return bert, root / "train.jsonl", root / "eval.jsonl"


def test_a_sequence_classifier_is_scored_by_its_labels_cross_entropy(tmp_path, classification_files):
    _, train_file, _ = classification_files
    torch.manual_seed(0)
    config = tiny_bert().config
    config.id2label, config.label2id = {0: "fox", 1: "nn"}, {"fox": 0, "nn": 1}
    classifier = BertForSequenceClassification(config).eval()
    path = save_tiny(classifier, tmp_path / "classifier", tiny_tokenizer(128, kind="encoder"))
    result = barrier_run(path, path, train_file, align=False, device="cpu", points=3, examples=6)
    records = [json.loads(line) for line in train_file.read_text().splitlines()][:6]
    batch = make_batches(
        tiny_tokenizer(128, kind="encoder"), [r["text"] for r in records],
        [config.label2id[r["label"]] for r in records], batch_size=6, max_length=128,
    )[0]  # fmt: skip
    with torch.no_grad():
        logits = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = float(torch.nn.functional.cross_entropy(logits, batch["labels"]))
    assert result["before"].losses == pytest.approx([expected] * 3, rel=1e-5)
    assert result["before"].barrier == 0.0
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a cat", "label": "cat"}))
    with pytest.raises(WeightkitError, match=r"labels \['cat'\] are not the model's"):
        barrier_run(path, path, other, align=False, device="cpu")


def test_intrinsic_dimension_of_a_tiny_classifier(classification_files):
    bert, train_file, eval_file = classification_files
    train = TrainConfig(max_steps=20, lr=3e-3, batch_size=8, max_length=16)
    dims = [1, 16, 256]
    result = intrinsic_dimension_run(
        bert, train_file, dims=dims, train=train, full_lr=1e-3, eval_data=eval_file, device="cpu"
    )
    intrinsic, runs = result["intrinsic"], result["runs"]
    assert result["metric"] == "accuracy" and intrinsic.full_score == result["full"]["accuracy"] == 1.0
    assert intrinsic.threshold == pytest.approx(0.9)
    # Exactly d numbers train in each run, all from the same start, scored on the same held-out examples.
    assert [run["trainable_parameters"] for run in runs] == dims
    assert [d for d, _ in intrinsic.curve] == dims
    # The curve rises with d (monotone-ish): the held-out loss falls from the smallest d to the largest, and
    # the largest reaches the full fine-tune's accuracy; d90 is the first crossing, inside the range.
    assert runs[-1]["eval"]["eval_loss"] < 0.5 * runs[0]["eval"]["eval_loss"]
    assert intrinsic.curve[-1][1] >= 0.9 > intrinsic.curve[0][1]
    assert intrinsic.d90 == next(d for d, score in intrinsic.curve if score >= 0.9)
    assert dims[0] < intrinsic.d90 <= dims[-1]


def test_intrinsic_dimension_of_a_causal_lm_measures_the_gain_in_held_out_loss(llama_dir, texts_file):
    train = TrainConfig(max_steps=4, lr=1e-2, batch_size=8, max_length=32)
    result = intrinsic_dimension_run(
        llama_dir, texts_file, bounds=(8, 64), train=train, full_lr=1e-2, eval_data=texts_file, device="cpu"
    )
    intrinsic = result["intrinsic"]
    assert result["metric"] == "negative eval loss"
    assert intrinsic.full_score == -result["full"]["eval_loss"]
    # The reference is the model before fine-tuning, scored on the same held-out texts (a plain reference).
    model, tokenizer, _ = load_model(llama_dir)
    batches = make_batches(tokenizer, TEXTS[:8], None, batch_size=8, max_length=32)
    with torch.no_grad():
        assert intrinsic.reference == pytest.approx(-float(mean_loss(model, batches)), rel=1e-5)
    assert intrinsic.threshold == pytest.approx(
        intrinsic.reference + 0.9 * (intrinsic.full_score - intrinsic.reference)
    )
    # The bisection tried doubling dimensions from 8 and never beyond 64.
    tried = [d for d, _ in intrinsic.curve]
    assert tried[0] == 8 and max(tried) <= 64 and tried == [run["d"] for run in result["runs"]]


def test_intrinsic_dimension_needs_one_search():
    with pytest.raises(WeightkitError, match="either dims"):
        intrinsic_dimension_run("unused", None, dims=[1], bounds=(1, 2))
