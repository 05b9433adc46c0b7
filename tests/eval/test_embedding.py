import copy

import pytest
import torch
import torch.nn.functional as F

from weightkit.data import stdlib_docstrings
from weightkit.eval import embedding_fidelity, mean_pool, sentence_embeddings

SENTENCES = [
    "A man is eating food.",
    "  A man is riding a horse.  ",
    "Quantization maps weights to a small grid of values.",
    "ok",
]


@pytest.fixture(scope="module")
def texts():
    # Real prose of very different lengths; the longest exceed 256 tokens and are truncated.
    passages = stdlib_docstrings("eval", max_chars=4000)
    longest = sorted(passages, key=len)[-2:]
    return SENTENCES + passages[:6] + longest


def test_mean_pool_matches_loop():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    lengths = [5, 1, 3]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    pooled = mean_pool(hidden, mask)
    for b, n in enumerate(lengths):
        expected = sum(hidden[b, t] for t in range(n)) / n
        torch.testing.assert_close(pooled[b], expected)
    assert mean_pool(hidden, torch.zeros(3, 5, dtype=torch.long)).abs().max() == 0


def test_sentence_embeddings_equal_sentence_transformers(minilm, minilm_path, texts, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model, tokenizer = minilm
    assert max(len(tokenizer(t)["input_ids"]) for t in texts) > 256
    st = SentenceTransformer(str(minilm_path), device="cpu")
    expected = st.encode(texts, convert_to_tensor=True, batch_size=4)
    got = sentence_embeddings(model, tokenizer, texts, batch_size=5)
    assert got.shape == (len(texts), 384) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(texts)))


def test_embedding_fidelity_is_one_with_itself_and_drops_with_noise(minilm):
    model, tokenizer = minilm
    texts = SENTENCES + stdlib_docstrings("eval", max_chars=300)[:4]
    assert embedding_fidelity(model, model, tokenizer, texts) == pytest.approx(1.0, abs=1e-6)

    def perturbed(scale):
        noisy = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in noisy.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    w += scale * w.std() * torch.randn(w.shape, generator=gen)
        return noisy

    heavily = perturbed(0.5)
    small = embedding_fidelity(model, perturbed(0.05), tokenizer, texts)
    large = embedding_fidelity(model, heavily, tokenizer, texts)
    assert 0.9999 > small > large
    # Independent reference: mean of torch's cosine similarity between the two embedding sets.
    expected = F.cosine_similarity(
        sentence_embeddings(model, tokenizer, texts), sentence_embeddings(heavily, tokenizer, texts)
    ).mean()
    assert large == pytest.approx(expected.item(), abs=1e-6)
