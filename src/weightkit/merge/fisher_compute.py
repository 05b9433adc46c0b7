"""Estimating a model's diagonal Fisher information, for Fisher merging (``weightkit fisher``).

Paper: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832; the merge that
uses it is :mod:`weightkit.merge.fisher`, the file it is saved in :mod:`weightkit.merge.fisher_file`.

``F = E_x E_{y ~ p(y|x)} [(d/dtheta log p(y|x))^2]``, averaged over examples ``x``, with the label ``y``
drawn from the *model's own* predictive distribution (the true Fisher, not the "empirical" Fisher of the
data labels). :func:`compute_fisher` offers three estimators:

- ``"exact"``: the expectation over ``y`` summed exactly, ``sum_c p(c|x) g_c^2``, one backward pass per
  class. This is what the reference code does for classifiers; only for one label per example.
- ``"sample"`` (default): one ``y`` sampled from ``p(y|x)`` per label position, an unbiased Monte Carlo
  estimate of the same Fisher. The default for language models, where the vocabulary makes the exact
  sum cost one backward pass per vocabulary entry.
- ``"empirical"``: the data's own labels (next tokens for a causal LM), for comparison; not the paper's.

For a causal LM the unit is the **sequence**: teacher-forced on the real prefix, each position ``t``
gets a label ``y_t`` for token ``t + 1`` and the per-sequence log-likelihood is
``sum_t log p(y_t | x_<=t)``; its gradient is squared per sequence and averaged over sequences. With
labels sampled independently per position, the cross terms have mean zero, so this estimates the sum
of the per-token Fishers of the sequence.

Gradients are taken one example at a time (a loop of ``torch.autograd.grad``): the square of the
gradient of a batch-summed loss would mix examples and is not the Fisher.

The reference code only implements the exact expectation for classifiers; the sampled estimator for
language models and the per-sequence unit are weightkit's.
"""

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from weightkit.errors import WeightkitError
from weightkit.merge.fisher_file import save_fisher
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.runtime.device import resolve_device

__all__ = ["FISHER_MODES", "compute_fisher", "fisher_checkpoint"]

FISHER_MODES = ("sample", "exact", "empirical")
# Hugging Face's "ignore this position" label.
_IGNORE = -100


class _Example:
    """One example: how to call the model on it, and its data labels (if any)."""

    def __init__(self, args: tuple, kwargs: dict[str, Any], labels: Tensor | None, mapping: bool):
        self.args = args
        self.kwargs = kwargs
        self.labels = labels
        self.mapping = mapping  # a dict batch (Hugging Face style): 3-D logits are a causal LM's


def _batch_rows(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        rows = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
    elif isinstance(batch, (tuple, list)) and batch:
        rows = {v.shape[0] for v in batch if isinstance(v, Tensor) and v.dim() > 0}
    else:
        rows = set()
    if len(rows) != 1:
        raise WeightkitError(
            "a Fisher batch must be a tensor, a (inputs, labels) tuple or a dict of tensors sharing their "
            f"first (batch) dimension; got {type(batch).__name__} with batch sizes {sorted(rows)}"
        )
    return rows.pop()


def _examples(batch: Any, device: torch.device) -> Iterable[_Example]:
    """Split a batch into single examples (batch dimension 1), padding on the right trimmed off."""
    for i in range(_batch_rows(batch)):
        if isinstance(batch, Tensor):
            yield _Example((batch[i : i + 1].to(device),), {}, None, mapping=False)
        elif isinstance(batch, Mapping):
            row = {k: v[i : i + 1] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            mask = row.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2:
                # Right padding only costs time: cut the columns after the last real token, so one
                # example costs what it would alone (and is computed exactly as alone).
                real = mask[0].nonzero()
                if len(real) == 0:
                    continue  # an all-padding row: nothing to run
                width = int(real[-1]) + 1
                row = {
                    k: v[:, :width] if isinstance(v, Tensor) and v.shape[:2] == mask.shape else v
                    for k, v in row.items()
                }
            labels = row.pop("labels", None)
            kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in row.items()}
            yield _Example((), kwargs, labels, mapping=True)
        else:
            inputs = batch[0][i : i + 1].to(device)
            labels = batch[1][i : i + 1] if len(batch) > 1 else None
            yield _Example((inputs,), {}, labels, mapping=False)


def _logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)) and logits and isinstance(logits[0], Tensor):
        logits = logits[0]
    if not isinstance(logits, Tensor):
        raise WeightkitError(
            f"the model returned {type(output).__name__}: the Fisher needs logits (a tensor, or an "
            "output with .logits)"
        )
    return logits


def _sample(log_probs: Tensor, generator: torch.Generator) -> Tensor:
    """One label per row of ``log_probs`` ``[rows, classes]``, drawn on the CPU (same on every device)."""
    probs = log_probs.detach().exp().cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(log_probs.device)


def _label_terms(
    example: _Example, logits: Tensor, mode: str, generator: torch.Generator
) -> list[tuple[Tensor, float]]:
    """The log-likelihood terms of one example and the weight of each term's squared gradient.

    ``"sample"``/``"empirical"``: one term, the summed log-probability of the labels, weight 1.
    ``"exact"``: one term per class ``c``, ``log p(c|x)``, weighted by ``p(c|x)``. An empty list means
    the example has nothing to predict (a one-token text).
    """
    if logits.dim() == 2:  # [1, classes]: one label per example
        log_probs = torch.log_softmax(logits[0].float(), dim=-1)
        if mode == "exact":
            probs = log_probs.detach().exp()
            return [(log_probs[c], float(probs[c])) for c in range(log_probs.shape[0])]
        if mode == "empirical":
            if example.labels is None:
                raise WeightkitError("mode 'empirical' needs labels: batches of (inputs, labels) or 'labels'")
            label = example.labels.reshape(-1)[0].to(log_probs.device)
        else:
            label = _sample(log_probs[None], generator)[0]
        return [(log_probs[label], 1.0)]

    if logits.dim() == 3 and example.mapping and "input_ids" in example.kwargs:  # causal LM [1, T, V]
        if mode == "exact":
            raise WeightkitError(
                "mode 'exact' needs one backward pass per class and is only offered for classifiers (one "
                "label per example); for a language model use 'sample' (the default) or 'empirical'"
            )
        input_ids = example.kwargs["input_ids"][0]
        # Position t predicts token t + 1; it counts if that token is real (and not labelled -100).
        valid = torch.ones(input_ids.shape[0] - 1, dtype=torch.bool, device=input_ids.device)
        mask = example.kwargs.get("attention_mask")
        if isinstance(mask, Tensor):
            valid &= mask[0, 1:].to(torch.bool)
        targets = input_ids[1:]
        if example.labels is not None:
            labels = example.labels[0].to(input_ids.device)
            valid &= labels[1:] != _IGNORE
            targets = labels[1:]
        if not bool(valid.any()):
            return []
        positions = valid.nonzero().squeeze(1)
        log_probs = torch.log_softmax(logits[0, positions].float(), dim=-1)
        chosen = targets[positions] if mode == "empirical" else _sample(log_probs, generator)
        return [(log_probs.gather(1, chosen[:, None]).sum(), 1.0)]

    raise WeightkitError(
        f"cannot read labels from logits of shape {tuple(logits.shape)}: the Fisher supports classifiers "
        "([batch, classes]) and causal LMs called with a dict holding input_ids ([batch, seq, vocab])"
    )


def _accumulate_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    mode: str,
    seed: int,
    total: int | None,
    progress: bool,
) -> tuple[dict[str, Tensor], int]:
    """The averaged squared per-example gradients, keyed by parameter name, and the example count."""
    if mode not in FISHER_MODES:
        raise WeightkitError(f"unknown Fisher mode {mode!r}: expected one of {', '.join(FISHER_MODES)}")
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        raise WeightkitError(
            f"{type(model).__name__} has no floating-point parameters to compute a Fisher for"
        )
    params = [p for _, p in named]
    device = params[0].device
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in named}
    generator = torch.Generator().manual_seed(seed)
    if total is None and not hasattr(batches, "__len__"):
        batches = list(batches)

    was_training = model.training
    needed_grad = [p.requires_grad for p in params]
    count = 0
    try:
        model.eval()  # the Fisher of the deployed model: no dropout
        for p in params:
            p.requires_grad_(True)  # frozen parameters get a Fisher too: a merge needs every tensor's
        with torch.enable_grad():
            for batch in track(batches, "Fisher", total=total, enabled=progress):
                for example in _examples(batch, device):
                    logits = _logits(model(*example.args, **example.kwargs))
                    terms = _label_terms(example, logits, mode, generator)
                    if not terms:
                        continue
                    count += 1
                    for k, (log_likelihood, weight) in enumerate(terms):
                        grads = torch.autograd.grad(
                            log_likelihood, params, retain_graph=k < len(terms) - 1, allow_unused=True
                        )
                        for (name, _), grad in zip(named, grads, strict=True):
                            if grad is not None:
                                g = grad.float()
                                fisher[name].addcmul_(g, g, value=weight)
    finally:
        for p, flag in zip(params, needed_grad, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise WeightkitError(
            "no example had anything to predict (a causal LM needs texts of two or more tokens)"
        )
    for tensor in fisher.values():
        tensor.div_(count)
    return fisher, count


def compute_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    mode: str = "sample",
    seed: int = 0,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """The diagonal Fisher information of every floating-point parameter of ``model``.

    ``F = mean over examples of (d/dtheta log p(y|x))^2`` with ``y`` drawn as ``mode`` says (see the
    module docstring); gradients are per example, one ``torch.autograd.grad`` call each, in eval mode.

    Batches may be:

    - a dict of tensors (Hugging Face style), passed as ``model(**batch)``; an optional ``labels`` entry is
      kept out of the call and used by ``"empirical"`` (and, for a causal LM, ``-100`` excludes a
      position). Right padding (``attention_mask == 0`` at the end) is cut off per example.
    - an ``(inputs, labels)`` or ``(inputs,)`` tuple, or a bare ``inputs`` tensor: ``model(inputs)``.

    The model's output (a tensor, or an object with ``.logits``) decides the likelihood: ``[1, classes]``
    is a classifier with one label per example; ``[1, seq, vocab]`` from a dict holding ``input_ids``
    is a causal LM, where position ``t`` is labelled for token ``t + 1`` if that token is real, and the
    unit is the sequence. Examples with nothing to predict (one-token texts) are skipped and not counted.

    Sampling (``"sample"``) is deterministic: ``torch.Generator().manual_seed(seed)`` on the CPU draws,
    example after example in batch order, ``torch.multinomial(probs, 1)`` for each example's
    ``[positions, classes]`` probabilities (computed in float32), whatever the model's device.

    Args:
        model: a ``torch.nn.Module``; its ``requires_grad`` flags, ``.grad`` fields and training mode
            are left as they were. Inputs are moved to the device of its first parameter.
        batches: an iterable of batches as above (a generator is read once, into a list, unless
            ``total`` is given).
        mode: ``"sample"`` (default), ``"exact"`` (classifiers only) or ``"empirical"``.
        seed: seed of the label sampling.
        total: the number of batches, for the progress bar when ``batches`` has no ``len``.
        progress: show a progress bar over batches.

    Returns:
        ``{parameter name: float32 Fisher}``, names as in ``model.named_parameters()`` (a tied parameter
        appears once, under its first name), on the parameters' devices.

    Raises:
        WeightkitError: unknown mode, malformed batches, ``"empirical"`` without labels, ``"exact"`` for a
            language model, logits of an unsupported shape, or no example with anything to predict.
    """
    fisher, _ = _accumulate_fisher(model, batches, mode=mode, seed=seed, total=total, progress=progress)
    return fisher


def _checkpoint_names(
    model: nn.Module, fisher: dict[str, Tensor], ckpt_names: list[str]
) -> dict[str, Tensor]:
    """Re-key a model's Fisher by the names its checkpoint stores.

    Every name under which a parameter is reachable (a tied parameter has several) is mapped to the
    checkpoint's naming; only names the checkpoint holds get an entry, so a tied ``lm_head.weight`` that
    the checkpoint leaves out gets none, and one it stores gets the shared Fisher.
    """
    from weightkit.models import CheckpointNames

    names = CheckpointNames(model, ckpt_names)
    stored = set(ckpt_names)
    canonical: dict[int, str] = {}
    for name, param in model.named_parameters():
        canonical[id(param)] = name
    out: dict[str, Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        source = canonical.get(id(param))
        ckpt_name = names.to_ckpt(name)
        if source in fisher and ckpt_name in stored:
            out[ckpt_name] = fisher[source]
    return out


def fisher_checkpoint(
    model_dir: str | os.PathLike,
    data: str | os.PathLike | None,
    out_path: str | os.PathLike,
    *,
    samples: int = 128,
    max_length: int = 512,
    seed: int = 0,
    mode: str = "sample",
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """Compute the Fisher of a Hugging Face causal LM on text and write it as a Fisher file.

    Texts come from :func:`weightkit.data.calibration_texts` (``samples`` passages chosen with
    ``seed``), are tokenized with the model's tokenizer and truncated to ``max_length`` tokens. The
    Fisher is per sequence, averaged over the texts of two or more tokens (their number is stored as
    ``examples`` in the metadata). Tensor names are those of the checkpoint's safetensors files.

    Args:
        model_dir: a local Hugging Face model directory (a causal LM with a tokenizer).
        data: a ``.txt``/``.jsonl``/``.json`` text file, or ``None`` for the standard-library docstrings.
        out_path: the ``.safetensors`` file to write.
        samples: how many texts.
        max_length: most tokens per text.
        seed: seed of the text choice and of the label sampling; same inputs and seed give the same file.
        mode: ``"sample"`` (default, the paper's Fisher) or ``"empirical"`` (the texts' own next tokens).
        batch_size: texts per tokenized batch (gradients are per text whatever this is).
        dtype: dtype to load the weights in (``None``: the checkpoint's own); Fishers accumulate in float32.
        device: where to run the model: None for the GPU when there is one
            (:func:`weightkit.runtime.device.resolve_device`), or ``"cpu"``, ``"cuda:1"`` ...
        overwrite: replace an existing ``out_path``.
        progress: show a progress bar.
        allow_pickle: also read ``.bin``/``.pt`` pickle checkpoints (unpickling can run code: trusted files
            only).

    Returns:
        ``out_path``.

    Raises:
        WeightkitError: not a causal-LM directory, no tokenizer, no usable text, bad arguments, an
            existing output without ``overwrite``, or a device this machine does not have.
    """
    from weightkit.checkpoint import CheckpointReader
    from weightkit.data import calibration_texts, tokenize_batches
    from weightkit.models import load_model

    # Its quantized weights are buffers, not parameters: the Fisher would silently leave them out.
    refuse_quantized(
        model_dir, verb="weightkit fisher", instead="compute the Fisher of the full-precision model"
    )

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise WeightkitError(f"{out_path}: a Fisher file must end in .safetensors")
    if out_path.exists() and not overwrite:
        raise WeightkitError(f"{out_path} exists; pass --force (overwrite=True) to overwrite it")
    if mode not in ("sample", "empirical"):
        raise WeightkitError(
            f"Fisher mode for a language model must be 'sample' or 'empirical', got {mode!r}"
        )
    if samples < 1 or max_length < 2:
        raise WeightkitError(f"need samples >= 1 and max_length >= 2, got {samples} and {max_length}")

    device = resolve_device(device)
    model, tokenizer, kind = load_model(model_dir, dtype=dtype, allow_pickle=allow_pickle)
    if kind != "causal-lm":
        raise WeightkitError(
            f"{model_dir} is a {kind} model: the Fisher needs an output distribution, so only causal LMs "
            "are supported"
        )
    if tokenizer is None:
        raise WeightkitError(f"{model_dir} has no tokenizer, so its text cannot be tokenized")
    texts = calibration_texts(data, samples, seed=seed)
    batches = tokenize_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    model.to(device)
    fisher, count = _accumulate_fisher(model, batches, mode=mode, seed=seed, total=None, progress=progress)
    with CheckpointReader(model_dir, allow_pickle=allow_pickle) as reader:
        ckpt_names = reader.names()
        model_type = (reader.config or {}).get("model_type", "")
    tensors = _checkpoint_names(model, fisher, ckpt_names)
    metadata = {
        "examples": count,
        "mode": mode,
        "unit": "sequence",
        "seed": seed,
        "max_length": max_length,
        "model_type": model_type,
    }
    return save_fisher(tensors, out_path, metadata=metadata, overwrite=overwrite)
