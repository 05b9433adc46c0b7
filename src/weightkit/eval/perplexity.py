"""Causal-language-model perplexity over a list of texts, with padding kept out of the statistics."""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from weightkit.data import tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.eval._runtime import eval_mode, model_device
from weightkit.progress import track

__all__ = ["token_nll", "perplexity"]


def token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood of a batch, and how many tokens it covers.

    Position ``t`` predicts token ``t + 1``. A prediction counts only if its target is a real token
    (``attention_mask == 1``), so padding adds neither loss nor count; the first token of each text
    is never predicted.

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        input_ids: ``[batch, seq]`` token ids.
        attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding.

    Returns:
        ``(nll_sum, n_tokens)``: a float64 scalar tensor (natural log) and an int.
    """
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return nll.double(), int((targets != -100).sum())


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Perplexity of a causal LM on ``texts``: ``exp(total NLL / total predicted tokens)``.

    Token-weighted over all texts (a long text counts more than a short one), each text scored on
    its own (no packing across texts) and truncated to ``max_length`` tokens. Runs on the model's
    device in eval mode without gradients; the model's training flag is restored afterwards.

    Args:
        model: A Hugging Face causal LM (its output has ``.logits``).
        tokenizer: Its tokenizer.
        texts: The evaluation passages.
        max_length: Most tokens per text.
        batch_size: Texts per forward pass.
        progress: Show a progress bar over batches.

    Returns:
        The perplexity (lower is better; a uniform guess over the vocabulary scores the vocabulary size).

    Raises:
        WeightkitError: No text has two or more tokens, so nothing can be predicted.
    """
    batches = tokenize_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    device = model_device(model)
    total_nll = 0.0
    total_tokens = 0
    with eval_mode(model):
        for batch in track(batches, "perplexity", enabled=progress):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            nll, count = token_nll(logits, input_ids, attention_mask)
            total_nll += nll.item()
            total_tokens += count
    if total_tokens == 0:
        raise WeightkitError(f"perplexity: none of the {len(texts)} texts has two or more tokens to score")
    return math.exp(total_nll / total_tokens)
