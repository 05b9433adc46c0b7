"""weightkit's quantized MiniLM in sentence-transformers, dequantized at load time as the README says."""

import torch
from sentence_transformers import SentenceTransformer
from transformers import CompressedTensorsConfig

from weightkit.compress import RTNConfig, compress_checkpoint
from weightkit.data import stdlib_docstrings
from weightkit.eval.embedding import sentence_embeddings
from weightkit.models import default_model_path, load_model


def test_sentence_transformers_encodes_our_quantized_minilm_close_to_the_original(tmp_path):
    out = compress_checkpoint(default_model_path(), tmp_path / "minilm-w4", RTNConfig(bits=4), progress=False)
    # sentence-transformers calls forward() directly, past compressed-tensors' decompress-on-first-forward
    # hook: the weights are dequantized when loading instead (README, "Using the output").
    dequantize = {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    quantized = SentenceTransformer(str(out), device="cpu", model_kwargs=dequantize)
    original = SentenceTransformer(str(default_model_path()), device="cpu")
    texts = stdlib_docstrings("eval")[:8]
    ours = quantized.encode(texts, convert_to_tensor=True)
    reference = original.encode(texts, convert_to_tensor=True)
    # sentence-transformers computes what weightkit's own QuantizedLinear model does, with the pipeline
    # of the copied modules.json (mean pooling, then normalisation) ...
    model, tokenizer, _ = load_model(out)
    torch.testing.assert_close(ours, sentence_embeddings(model, tokenizer, texts), rtol=0, atol=1e-5)
    # ... and the 4-bit weights give embeddings close to, but not the same as, the original's (RTN's
    # held-out mean cosine in the README's demo table is 0.935).
    cosine = torch.nn.functional.cosine_similarity(ours, reference)
    assert 0.9 < cosine.mean() < 0.99 and cosine.min() > 0.85, cosine
