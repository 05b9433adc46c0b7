"""``compress(model, config)``: compress a model in memory with the method its config names (the registry's
entry for the config's type). :mod:`weightkit.compress.stream` builds on it for checkpoints that must load
whole."""

import torch
from torch import nn

from weightkit.compress.prune.stages import stages_as_run
from weightkit.errors import require_finite
from weightkit.registry import entry_for_config
from weightkit.runtime.device import resolve_device

__all__ = ["compress"]


def compress(
    model: nn.Module,
    config,
    data=None,
    *,
    tokenizer=None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Compress ``model`` in place with the method ``config`` names, and return it.

    Args:
        model: a Hugging Face ``transformers`` model (see :mod:`weightkit.arch`).
        config: e.g. ``RTNConfig(bits=4)``, ``GPTQConfig(bits=4, group_size=128)``, ``AWQConfig(...)``,
            ``VPTQConfig(bits=2)``, ``GWQConfig(bits=3, outlier_fraction=0.01)``,
            ``SparseGPTConfig(sparsity="2:4")``;
            or a list of stages, pruning configs then at most one quantization config, which keeps the zeros
            (see :mod:`weightkit.compress.prune.stages`).
        data: calibration data for GPTQ/AWQ/VPTQ/GWQ: ``None`` (docstrings of Python's standard library),
            a text/jsonl file path, a list of texts, or tokenized batches. Ignored by RTN.
        tokenizer: the model's tokenizer, needed when ``data`` is text.
        progress: show a progress bar.
        device: where to compute (``"cuda"``, ``"cuda:1"``, ``"cpu"`` ...); ``None``: where the model
            is. The model stays where it is: GPTQ/AWQ/VPTQ move one transformer block at a time to
            ``device`` (and, to capture the first block's inputs, the embeddings), RTN one weight, GWQ a
            copy of the whole model for its gradient pass and then one weight at a time.
    """
    if isinstance(config, list | tuple):
        for stage in stages_as_run(list(config)):
            compress(model, stage, data, tokenizer=tokenizer, progress=progress, device=device)
        return model
    entry = entry_for_config(config)
    target = None if device is None else resolve_device(device)
    for name, param in model.named_parameters():
        require_finite(param, name)
    return entry.fn(model, config, data=data, tokenizer=tokenizer, progress=progress, device=target)
