import pytest

from weightkit.errors import WeightkitError
from weightkit.eval import embedding_fidelity, evaluate, perplexity

TEXTS = ["The first evaluation text.", "And a second, somewhat longer, evaluation text."]


def test_evaluate_causal_lm_reports_perplexity(tiny_llama, char_tokenizer):
    result = evaluate(tiny_llama, char_tokenizer, "causal-lm", TEXTS)
    assert result == {"perplexity": perplexity(tiny_llama, char_tokenizer, TEXTS)}


def test_evaluate_encoder_reports_fidelity_against_reference(minilm):
    model, tokenizer = minilm
    result = evaluate(model, tokenizer, "encoder", TEXTS, reference=model)
    assert list(result) == ["embedding_fidelity"]
    assert result["embedding_fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert result["embedding_fidelity"] == embedding_fidelity(model, model, tokenizer, TEXTS)


def test_evaluate_errors(minilm):
    model, tokenizer = minilm
    with pytest.raises(WeightkitError, match="reference model"):
        evaluate(model, tokenizer, "encoder", TEXTS)
    with pytest.raises(WeightkitError, match="cannot evaluate a 'seq2seq' model"):
        evaluate(model, tokenizer, "seq2seq", TEXTS)
    with pytest.raises(WeightkitError, match="no evaluation texts"):
        evaluate(model, tokenizer, "encoder", [], reference=model)
