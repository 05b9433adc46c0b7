"""Evaluation: perplexity for causal LMs, embedding fidelity for encoders."""

from collections.abc import Sequence
from typing import Any

import torch

from weightkit.errors import WeightkitError
from weightkit.eval.embedding import embedding_fidelity, mean_pool, sentence_embeddings
from weightkit.eval.perplexity import perplexity, token_nll
from weightkit.runtime.device import resolve_device

__all__ = [
    "perplexity",
    "token_nll",
    "sentence_embeddings",
    "mean_pool",
    "embedding_fidelity",
    "evaluate",
]


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    kind: str,
    texts: Sequence[str],
    reference: torch.nn.Module | None = None,
    *,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """The quality measure that fits the model: what ``weightkit eval`` reports.

    Args:
        model: The model to evaluate.
        tokenizer: Its tokenizer.
        kind: ``"causal-lm"`` (perplexity) or ``"encoder"`` (embedding fidelity against ``reference``).
        texts: The evaluation passages (e.g. ``weightkit.data.stdlib_docstrings("eval")``).
        reference: The original encoder; required for ``"encoder"``, ignored for ``"causal-lm"``.
        progress: Show progress bars.
        device: Move ``model`` (and ``reference``) there first (in place); ``None`` runs them where they are.

    Returns:
        ``{"perplexity": float}`` or ``{"embedding_fidelity": float}``.

    Raises:
        WeightkitError: Unknown ``kind``, no texts, or an encoder without a reference.
    """
    if not texts:
        raise WeightkitError("no evaluation texts")
    if device is not None:
        device = resolve_device(device)
        for each in (model, reference):
            if each is not None:
                each.to(device)
    if kind == "causal-lm":
        return {"perplexity": perplexity(model, tokenizer, texts, progress=progress)}
    if kind == "encoder":
        if reference is None:
            raise WeightkitError(
                "embedding fidelity of an encoder needs a reference model (the original) to compare against"
            )
        return {
            "embedding_fidelity": embedding_fidelity(reference, model, tokenizer, texts, progress=progress)
        }
    raise WeightkitError(
        f"cannot evaluate a {kind!r} model: evaluation measures causal LMs (perplexity) and text encoders "
        "(embedding fidelity)"
    )
