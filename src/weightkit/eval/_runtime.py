"""What every evaluation needs around a model: its device, and eval mode for the duration."""

import contextlib
from collections.abc import Iterator

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd inside; each model's training flag is restored after."""
    was_training = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, training in zip(models, was_training, strict=True):
            model.train(training)
