"""Fisher merging: a per-entry weighted average where each model weighs by its diagonal Fisher information.

Paper: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832 (NeurIPS 2022).
Reference code: github.com/mmatena/model_merging (TensorFlow).

**The merge.** Each model's posterior is approximated (Laplace) by a Gaussian centred on its parameters
``theta_i`` with the diagonal Fisher ``F_i`` as precision. Maximising the weighted joint log-posterior has
the closed form, entry by entry,

    theta*(j) = sum_i w_i F_i(j) theta_i(j) / sum_i w_i F_i(j)

with merging weights ``w_i >= 0``. As in the reference code, every Fisher is raised to a floor ``eps``
(default 1e-6) before use, so an entry where no model has any Fisher mass gets the plain weighted
average, and a model whose Fisher is ~0 on an entry contributes (almost) nothing there.

**The Fisher.** ``F = E_x E_{y ~ p(y|x)} [(d/dtheta log p(y|x))^2]``, averaged over examples ``x``, with
the label ``y`` drawn from the *model's own* predictive distribution (the true Fisher, not the
"empirical" Fisher of the data labels). :func:`compute_fisher` offers three estimators:

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

**Deliberate deviations from the reference code:**

- The floor is applied to every model's Fisher. The reference code's default
  (``favor_target_model=True``) floors only the first model's, so an entry where every Fisher is zero
  keeps the first model's value there instead of getting the weighted average.
- :func:`fisher_merge` does not rescale models by the norms of their Fishers. The reference code's
  default ``normalize_fishers=True`` divides each model's weight by the global L2 norm of its Fisher;
  callers who want that pass ``w_i / fisher_norm(F_i)`` as weights (:func:`fisher_norm`).
- ``eps = 0`` is allowed; entries whose weighted Fisher sum is then exactly 0 get the weighted average
  (the reference code would divide 0 by 0).
- The reference code only implements the exact expectation for classifiers; the sampled estimator for
  language models, the per-sequence unit and the file format below are weightkit's.

**File format.** :func:`save_fisher` writes one ``.safetensors`` file whose tensor names are the
model's tensor names *as stored in its checkpoint* (so the Fisher of tensor ``X`` is read under ``X``)
and whose metadata holds ``{"weightkit": "fisher", "examples": N, ...}``; a tied ``lm_head`` the
checkpoint does not store gets no entry either.
"""

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from weightkit.checkpoint.writer import atomic_file
from weightkit.errors import WeightkitError, require_finite
from weightkit.merge.params import Spec, check_range
from weightkit.progress import track
from weightkit.registry import register

__all__ = [
    "DEFAULT_EPS",
    "FISHER_MODES",
    "fisher_merge",
    "fisher_norm",
    "compute_fisher",
    "save_fisher",
    "load_fisher",
    "fisher_checkpoint",
    "FisherConfig",
]

# The reference code's fisher_floor.
DEFAULT_EPS = 1e-6
FISHER_MODES = ("sample", "exact", "empirical")
# Hugging Face's "ignore this position" label.
_IGNORE = -100


# -- the merge -------------------------------------------------------------------------------------------


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise WeightkitError(f"fisher merge got {n} tensors but {len(weights)} weights")
    values = [float(w) for w in weights]
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise WeightkitError(f"fisher merge: weight {i} is {w}; weights must be finite and >= 0")
    if sum(values) <= 0:
        raise WeightkitError(f"fisher merge: the weights {values} sum to zero; at least one must be positive")
    return values


def fisher_merge(
    tensors: list[Tensor], fishers: list[Tensor], weights: list[float], *, eps: float = DEFAULT_EPS
) -> Tensor:
    """Merge one tensor of several models, each entry weighted by the models' Fisher information.

    ``out = sum_i w_i max(F_i, eps) t_i / sum_i w_i max(F_i, eps)``, entry by entry. Where every
    ``F_i <= eps`` this is the weighted average ``sum_i w_i t_i / sum_i w_i``; a model whose Fisher is
    far below the others' on an entry has (almost) no say there.

    Args:
        tensors: the same tensor (same shape) from each model; not modified.
        fishers: each model's diagonal Fisher for that tensor, same shape, finite and >= 0.
        weights: one merging weight per model, finite and >= 0, not all 0 (they need not sum to 1).
        eps: floor of every Fisher entry (absolute, in the Fishers' units); 0 disables it, and entries
            whose weighted Fisher sum is then 0 get the weighted average.

    Returns:
        A new tensor in the dtype of ``tensors[0]``, computed in at least float32.

    Raises:
        WeightkitError: no tensors, count or shape mismatches, negative or non-finite Fishers, bad
            weights or ``eps``.
    """
    n = len(tensors)
    if n == 0:
        raise WeightkitError("fisher merge needs at least one tensor")
    if len(fishers) != n:
        raise WeightkitError(f"fisher merge got {n} tensors but {len(fishers)} Fishers")
    values = _check_weights(weights, n)
    if not math.isfinite(eps) or eps < 0:
        raise WeightkitError(f"fisher merge: eps must be finite and >= 0, got {eps}")
    shape = tensors[0].shape
    for i, (tensor, fisher) in enumerate(zip(tensors, fishers, strict=True)):
        if tensor.shape != shape:
            raise WeightkitError(
                f"fisher merge: tensor {i} has shape {tuple(tensor.shape)}, tensor 0 has {tuple(shape)}"
            )
        if fisher.shape != shape:
            raise WeightkitError(
                f"fisher merge: Fisher {i} has shape {tuple(fisher.shape)}, its tensor has {tuple(shape)}"
            )
        require_finite(fisher, f"Fisher {i}")
        if fisher.numel() and float(fisher.min()) < 0:
            raise WeightkitError(f"fisher merge: Fisher {i} has negative entries; a Fisher is >= 0")

    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    # Two accumulators and one temporary per model instead of [n_models, ...] stacks: on a 32000x4096
    # embedding every full-size copy is 0.5 GB.
    numerator = torch.zeros(shape, dtype=dtype, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    for tensor, fisher, weight in zip(tensors, fishers, values, strict=True):
        if weight == 0:
            continue
        weighted = fisher.to(dtype).clamp_min(eps).mul_(weight)
        denominator.add_(weighted)
        numerator.addcmul_(weighted, tensor.to(dtype))
        del weighted
    empty = denominator == 0  # only possible with eps == 0
    if bool(empty.any()):
        average = torch.zeros_like(numerator)
        for tensor, weight in zip(tensors, values, strict=True):
            average.add_(tensor.to(dtype), alpha=weight)
        average.div_(sum(values))
        numerator = torch.where(empty, average, numerator)
        denominator.masked_fill_(empty, 1.0)
    return numerator.div_(denominator).to(tensors[0].dtype)


def fisher_norm(fisher: Mapping[str, Tensor] | str | os.PathLike) -> float:
    """Global L2 norm ``sqrt(sum over all tensors and entries of F^2)`` of one model's Fisher.

    The reference code divides each model's merging weight by this (``normalize_fishers``), so that a
    model whose Fisher is larger overall (more examples summed, a sharper loss) does not dominate.

    Args:
        fisher: a dict of Fisher tensors, or the path of a file written by :func:`save_fisher` (read one
            tensor at a time).

    Returns:
        The norm, accumulated in float64.
    """
    total = 0.0
    if isinstance(fisher, Mapping):
        for tensor in fisher.values():
            total += float(tensor.double().square().sum())
        return math.sqrt(total)
    from weightkit.checkpoint import CheckpointReader

    with CheckpointReader(fisher) as reader:
        for name in reader.names():
            total += float(reader.get(name).double().square().sum())
    return math.sqrt(total)


# -- computing the Fisher --------------------------------------------------------------------------------


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


# -- the file format -------------------------------------------------------------------------------------


def save_fisher(
    fisher: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Fisher to one ``.safetensors`` file, atomically.

    The file is written beside ``path`` under a temporary name and renamed into place when complete, so
    a crash never leaves a truncated Fisher at ``path``. Tensor names are written as given: pass the
    names of the checkpoint the Fisher belongs to (:func:`fisher_checkpoint` does).

    Args:
        fisher: ``{tensor name: Fisher}``; floating-point, finite, >= 0.
        path: the file to write; must end in ``.safetensors``.
        metadata: extra safetensors metadata (values are stored as strings), e.g. ``{"examples": 128}``;
            ``"format": "pt"`` and ``"weightkit": "fisher"`` are always set.
        overwrite: replace an existing file.

    Returns:
        ``path``.

    Raises:
        WeightkitError: an empty Fisher, a non-float, negative or non-finite tensor (named), a bad
            extension, or an existing file without ``overwrite``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightkitError(f"{path}: a Fisher file must end in .safetensors")
    if not fisher:
        raise WeightkitError("refusing to write an empty Fisher (no tensors)")
    if path.exists() and not overwrite:
        raise WeightkitError(f"{path} exists; pass --force (overwrite=True) to overwrite it")
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in fisher.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise WeightkitError(f"Fisher of {name} is not a floating-point tensor")
        require_finite(tensor, f"Fisher of {name}")
        if tensor.numel() and float(tensor.min()) < 0:
            raise WeightkitError(f"Fisher of {name} has negative entries; a Fisher is >= 0")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (a tied weight's Fisher under two names).
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": "pt", "weightkit": "fisher"})

    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load_fisher(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by :func:`save_fisher`.

    For merging large models, read it lazily instead: ``CheckpointReader(path).get(name)``.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        WeightkitError: the file is missing, corrupt, or not a weightkit Fisher file.
    """
    from weightkit.checkpoint import CheckpointReader

    with CheckpointReader(path) as reader:
        if reader.metadata.get("weightkit") != "fisher":
            raise WeightkitError(f"{path} is not a weightkit Fisher file (no 'weightkit: fisher' metadata)")
        return {name: reader.get(name) for name in reader.names()}, dict(reader.metadata)


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
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Compute the Fisher of a Hugging Face causal LM on text and write it as a Fisher file.

    Texts come from :func:`weightkit.data.calibration_texts` (``samples`` passages chosen with
    ``seed``), are tokenized with the model's tokenizer and truncated to ``max_length`` tokens. The
    Fisher is per sequence, averaged over the texts of two or more tokens (their number is stored as
    ``examples`` in the metadata). Tensor names are those of the checkpoint's safetensors files.

    Args:
        model_dir: a local Hugging Face model directory (a Llama-style causal LM with a tokenizer).
        data: a ``.txt``/``.jsonl``/``.json`` text file, or ``None`` for the standard-library docstrings.
        out_path: the ``.safetensors`` file to write.
        samples: how many texts.
        max_length: most tokens per text.
        seed: seed of the text choice and of the label sampling; same inputs and seed give the same file.
        mode: ``"sample"`` (default, the paper's Fisher) or ``"empirical"`` (the texts' own next tokens).
        batch_size: texts per tokenized batch (gradients are per text whatever this is).
        dtype: dtype to load the weights in (``None``: the checkpoint's own); Fishers accumulate in float32.
        device: where to run the model.
        overwrite: replace an existing ``out_path``.
        progress: show a progress bar.

    Returns:
        ``out_path``.

    Raises:
        WeightkitError: not a causal-LM directory, no tokenizer, no usable text, bad arguments, or an
            existing output without ``overwrite``.
    """
    from weightkit.checkpoint import CheckpointReader
    from weightkit.data import calibration_texts, tokenize_batches
    from weightkit.models import load_model

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

    model, tokenizer, kind = load_model(model_dir, dtype=dtype)
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
    with CheckpointReader(model_dir) as reader:
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


@dataclass
class FisherConfig:
    """Fisher merging (``merge_method: fisher``): each model gives a Fisher file from ``weightkit fisher``.

    ::

        models:
          - {model: ./ft-a, parameters: {fisher: ./ft-a.fisher.safetensors}}
          - {model: ./ft-b, parameters: {fisher: ./ft-b.fisher.safetensors, weight: 0.5}}
        merge_method: fisher

    Attributes:
        weight: each model's merging weight (>= 0; a model entry's ``weight`` overrides it).
        fisher: a default Fisher file (normally each model entry names its own).
        eps: floor of every Fisher entry (see :func:`fisher_merge`); entries where every model's Fisher
            is below it get the weighted average.
        normalize_fishers: divide each model's weight by the L2 norm of its whole Fisher, as the paper's
            reference code does by default, so models whose Fishers were estimated at different scales
            (other data, other lengths) count equally. Off by default: the paper's equation has no such
            factor.
    """

    weight: Spec = 1.0
    fisher: str | None = None
    eps: float = DEFAULT_EPS
    normalize_fishers: bool = False

    per_model: ClassVar[tuple[str, ...]] = ("weight", "fisher")
    files: ClassVar[tuple[str, ...]] = ("fisher",)
    needs_base: ClassVar[bool] = False
    model_count: ClassVar[tuple[int, int | None]] = (2, None)

    def __post_init__(self):
        check_range(self.weight, "fisher: weight", 0.0, math.inf)
        if not (isinstance(self.eps, int | float) and self.eps >= 0):
            raise WeightkitError(f"fisher: eps must be a number >= 0, got {self.eps!r}")


def _fisher_merger(config: FisherConfig, plan, model_params):
    norms = [fisher_norm(p["fisher"]) if config.normalize_fishers else 1.0 for p in model_params]

    def merge_tensor(inputs):
        weights = [p["weight"] / norm for p, norm in zip(inputs.params, norms, strict=True)]
        return fisher_merge(inputs.tensors, [p["fisher"] for p in inputs.params], weights, eps=config.eps)

    return merge_tensor


register("merge", "fisher", FisherConfig, _fisher_merger)
