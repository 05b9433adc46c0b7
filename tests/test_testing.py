"""weightkit.testing: the tiny seeded builders used across the tests."""

import pytest
import torch
import transformers

from weightkit.errors import WeightkitError
from weightkit.testing import tiny_bert, tiny_llama, tiny_tokenizer


def test_tiny_builders_are_small_and_seeded():
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert not a.training
    cfg = a.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (32, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 128)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert tiny_llama(num_hidden_layers=3).config.num_hidden_layers == 3
    bert = tiny_bert(seed=0)
    assert isinstance(bert, transformers.BertModel) and not bert.training
    assert (bert.config.hidden_size, bert.config.num_hidden_layers, bert.config.vocab_size) == (32, 2, 128)
    assert torch.equal(
        bert.encoder.layer[0].output.dense.weight, tiny_bert(seed=0).encoder.layer[0].output.dense.weight
    )


def test_tiny_tokenizer_causal_lm():
    tok = tiny_tokenizer(128)
    assert tok.get_vocab() == tiny_tokenizer(128).get_vocab()  # deterministic
    assert len(tok) == 128
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    text = "The weights of a model are rounded onto a grid."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert max(ids) < 128
    assert tok.unk_token_id not in ids  # every letter of the text is in the vocabulary
    assert len(ids) < len(text) / 2  # merges learned real subwords, not one id per character
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    # It drives a tiny Llama of the same vocabulary.
    batch = tok([text, "a fox"], return_tensors="pt", padding=True)
    logits = tiny_llama()(**batch).logits
    assert logits.shape[:2] == batch.input_ids.shape


def test_tiny_tokenizer_encoder():
    tok = tiny_tokenizer(128, kind="encoder")
    ids = tok("the quick brown fox").input_ids
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert max(ids) < 128
    with pytest.raises(WeightkitError, match="too small"):
        tiny_tokenizer(20)
    with pytest.raises(WeightkitError, match="unknown tokenizer kind"):
        tiny_tokenizer(128, kind="vision")
