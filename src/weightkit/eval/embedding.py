"""Sentence embeddings of an encoder, and how faithfully a changed encoder reproduces them."""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from weightkit.data import tokenize_batches
from weightkit.eval._runtime import eval_mode, model_device
from weightkit.progress import track

__all__ = ["mean_pool", "sentence_embeddings", "embedding_fidelity", "mean_cosine"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors of each sequence over its real (non-padding) tokens.

    Args:
        hidden: ``[batch, seq, dim]`` token vectors.
        attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding.

    Returns:
        ``[batch, dim]`` float32; all zeros for a sequence without real tokens.
    """
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    # The same floor sentence-transformers uses, so an empty row gives zeros rather than NaN.
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def _last_hidden_state(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        # A model with a head (e.g. BertForMaskedLM) returns logits; ask it for its hidden states.
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    return hidden


def sentence_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 256,
    progress: str | None = None,
) -> torch.Tensor:
    """Sentence embeddings the way sentence-transformers' all-MiniLM-L6-v2 computes them.

    Its pipeline (``modules.json``) is Transformer -> Pooling (``1_Pooling/config.json``: mean over
    tokens) -> Normalize, with texts stripped and truncated to 256 tokens (``max_seq_length``). This
    reproduces it on the bare encoder: mean of ``last_hidden_state`` over non-padding tokens, then
    L2-normalised.

    Args:
        model: An encoder (e.g. ``transformers.AutoModel`` of a BERT).
        tokenizer: Its tokenizer.
        texts: The sentences or passages.
        batch_size: Texts per forward pass.
        max_length: Most tokens per text.
        progress: Show a progress bar over batches, with this label (``None``: none).

    Returns:
        ``[len(texts), hidden_size]`` float32 on the CPU, rows of unit length.
    """
    stripped = [text.strip() for text in texts]
    device = model_device(model)
    rows = []
    with eval_mode(model):
        batches = tokenize_batches(tokenizer, stripped, max_length=max_length, batch_size=batch_size)
        for batch in track(batches, progress or "", enabled=progress is not None):
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            pooled = mean_pool(_last_hidden_state(model, batch), batch["attention_mask"])
            rows.append(F.normalize(pooled, p=2, dim=1).cpu())
    if not rows:
        return torch.zeros(0, 0)
    return torch.cat(rows)


def embedding_fidelity(
    reference_model: torch.nn.Module,
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    progress: bool = False,
    **kwargs: Any,
) -> float:
    """Mean cosine similarity of two encoders' sentence embeddings of the same texts.

    The quality measure for a compressed or merged encoder: 1.0 means it embeds every text exactly
    as the reference does.

    Args:
        reference_model: The original encoder.
        model: The changed encoder (same tokenizer).
        tokenizer: The shared tokenizer.
        texts: The evaluation passages.
        progress: Show progress bars (one per model).
        **kwargs: ``batch_size`` / ``max_length``, passed to :func:`sentence_embeddings`.

    Returns:
        The mean cosine similarity, in [-1, 1].
    """
    labels = ("reference embeddings", "embeddings") if progress else (None, None)
    reference = sentence_embeddings(reference_model, tokenizer, texts, progress=labels[0], **kwargs)
    return mean_cosine(reference, sentence_embeddings(model, tokenizer, texts, progress=labels[1], **kwargs))


def mean_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """The mean row-wise cosine of two ``[texts, dim]`` :func:`sentence_embeddings` (rows of unit length, so
    the row-wise dot product is the cosine)."""
    return float((reference * candidate).sum(dim=1).mean())
