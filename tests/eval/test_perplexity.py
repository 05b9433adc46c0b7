import math
from types import SimpleNamespace

import pytest
import torch

from weightkit.data import stdlib_docstrings
from weightkit.errors import WeightkitError
from weightkit.eval import perplexity, token_nll

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "A much longer passage: it keeps going for a while, so that padding in a batch with the short ones "
    "is substantial and any leak of padded positions into the statistics would show.",
    "x",
    "Medium length text, with punctuation!",
]


def reference_perplexity(model, tokenizer, texts, max_length):
    """One text at a time, no padding anywhere, token NLLs summed in a plain loop."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            for t in range(len(ids) - 1):
                nll -= log_probs[t, ids[t + 1]].item()
                count += 1
    return math.exp(nll / count)


def test_token_nll_matches_loop_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    input_ids = torch.randint(0, 11, (3, 6))
    lengths = [6, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    nll, count = token_nll(logits, input_ids, mask)
    expected, expected_count = 0.0, 0
    for b, n in enumerate(lengths):
        for t in range(n - 1):
            row = logits[b, t].double()
            expected += (torch.logsumexp(row, 0) - row[input_ids[b, t + 1]]).item()
            expected_count += 1
    assert count == expected_count == 5 + 1 + 3
    assert nll.dtype == torch.float64
    assert nll.item() == pytest.approx(expected, rel=1e-6)
    # Garbage in padded positions changes nothing.
    noisy_ids = input_ids.masked_fill(mask == 0, 7)
    noisy_logits = logits.masked_fill((mask == 0).unsqueeze(-1), 50.0)
    assert token_nll(noisy_logits, noisy_ids, mask)[0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_perplexity_equals_per_text_loop(tiny_llama, char_tokenizer, batch_size):
    expected = reference_perplexity(tiny_llama, char_tokenizer, TEXTS, max_length=512)
    assert perplexity(tiny_llama, char_tokenizer, TEXTS, batch_size=batch_size) == pytest.approx(
        expected, rel=1e-5
    )


def test_perplexity_truncates_and_ignores_tokenizer_padding_side(tiny_llama, char_tokenizer):
    char_tokenizer.padding_side = "left"
    expected = reference_perplexity(tiny_llama, char_tokenizer, TEXTS, max_length=12)
    got = perplexity(tiny_llama, char_tokenizer, TEXTS, max_length=12, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(perplexity(tiny_llama, char_tokenizer, TEXTS), rel=1e-3)


def test_random_model_is_near_uniform_and_a_right_token_bias_lowers_it(tiny_llama, char_tokenizer):
    texts = stdlib_docstrings("eval")[:8]
    vocab = tiny_llama.config.vocab_size
    random_ppl = perplexity(tiny_llama, char_tokenizer, texts, max_length=128)
    # Small random weights give near-flat logits: about as good as guessing uniformly.
    assert 0.8 * vocab < random_ppl < 1.25 * vocab

    bias = 3.0

    class Oracle(torch.nn.Module):
        """Adds ``bias`` to the logit of the true next token, so only a correct shift benefits."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
            boost = torch.zeros_like(logits)
            boost[:, :-1].scatter_(-1, input_ids[:, 1:].unsqueeze(-1), bias)
            return SimpleNamespace(logits=logits + boost)

    biased_ppl = perplexity(Oracle(tiny_llama), char_tokenizer, texts, max_length=128)
    # With flat logits, p(right) = e^b / (e^b + V - 1), so perplexity = (e^b + V - 1) / e^b.
    flat = (math.exp(bias) + vocab - 1) / math.exp(bias)
    assert biased_ppl < random_ppl / 10
    assert biased_ppl == pytest.approx(flat, rel=0.2)


def test_perplexity_turns_dropout_off_and_restores_training_mode(tiny_llama, char_tokenizer):
    for module in tiny_llama.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    tiny_llama.train()
    with torch.no_grad():  # the dropout is live in training mode: two passes differ
        ids = char_tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
        assert not torch.equal(tiny_llama(ids).logits, tiny_llama(ids).logits)
    first = perplexity(tiny_llama, char_tokenizer, TEXTS)
    assert tiny_llama.training
    # Dropout was off during evaluation: the same number twice, equal to the eval-mode reference.
    assert perplexity(tiny_llama, char_tokenizer, TEXTS) == first
    expected = reference_perplexity(tiny_llama.eval(), char_tokenizer, TEXTS, max_length=512)
    assert first == pytest.approx(expected, rel=1e-5)


def test_perplexity_with_nothing_to_predict(tiny_llama, char_tokenizer):
    with pytest.raises(WeightkitError, match="two or more tokens"):
        perplexity(tiny_llama, char_tokenizer, ["", ""])
