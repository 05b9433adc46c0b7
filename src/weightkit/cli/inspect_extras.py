"""What ``weightkit inspect`` runs for its options that train, align or differentiate a model: the
intrinsic dimension (``--intrinsic-dim``), the Hessian's top eigenvalues and density (``--hessian``) and the
loss barrier between two checkpoints (``--barrier OTHER``).

The math is :mod:`weightkit.inspect.intrinsic` and :mod:`weightkit.inspect.hessian`; this layer combines it
with other verbs, which only the CLI may do: ``weightkit.adapt``'s DID/SAID subspaces and adapter trainer,
``weightkit train``'s full fine-tune, ``weightkit align``'s permutation alignment.

The loss (Hessian, barrier) is the one the trainers minimise, on the examples of ``data``: the causal-LM loss
of the texts for a causal LM (token-weighted mean over the batches), the cross-entropy of the ``label``
fields for a sequence classifier (a checkpoint saved as ``...ForSequenceClassification``, labels mapped
through its ``config.label2id``). A bare encoder has no loss of its own and is refused, as are quantized
checkpoints (their integer weights are neither differentiable nor interpolable).
"""

import copy
import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from weightkit.adapt.layer import adapt
from weightkit.adapt.subspace import SubspaceConfig
from weightkit.adapt.trainer import train_adapter
from weightkit.arch import model_task
from weightkit.checkpoint.files import read_json_object
from weightkit.data import load_texts, stdlib_docstrings
from weightkit.errors import WeightkitError
from weightkit.inspect.hessian import hessian_operator, lanczos, loss_barrier, slq_density
from weightkit.inspect.intrinsic import IntrinsicDimension, d90_bisect, d90_sweep
from weightkit.merge.align import align_checkpoint
from weightkit.models import load_model, load_tokenizer
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.runtime.device import resolve_device
from weightkit.runtime.training import (
    TrainConfig,
    evaluate,
    forward_batch,
    load_examples,
    make_batches,
    prepare_training,
)
from weightkit.train.trainer import train_model

__all__ = ["intrinsic_dimension_run", "barrier_run", "hessian_run", "mean_loss"]


def mean_loss(model: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    """The model's loss over ``batches`` (from :func:`~weightkit.runtime.training.make_batches`), weighted as
    the trainers' evaluation weighs it: by predicted tokens for a causal LM, by examples for a classifier.
    Differentiable (wrap it in ``torch.no_grad()`` when only the value is wanted)."""
    total, weight = 0.0, 0
    for batch in batches:
        labels = batch["labels"]
        # A classifier's labels are one class id per example; a causal LM's are the shifted token ids.
        count = labels.shape[0] if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())
        total = total + forward_batch(model, batch).loss * count
        weight += count
    if weight == 0:
        raise WeightkitError("the examples have nothing to predict (every text is shorter than two tokens)")
    return total / weight


def _model_and_batches(
    model_dir: str | Path,
    data: str | Path | None,
    *,
    examples: int,
    batch_size: int,
    max_length: int,
    device: torch.device,
    verb: str,
) -> tuple[nn.Module, list[dict[str, Tensor]]]:
    """A causal LM or sequence classifier in float32 and eval mode on ``device``, and the first ``examples``
    examples of ``data`` as batches with labels (module docstring)."""
    from transformers import AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise WeightkitError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    refuse_quantized(model_dir, verb=verb, instead="inspect the full-precision model")
    config = read_json_object(config_file)
    task = model_task(config)
    classifier = task == "encoder" and any(
        str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or []
    )
    if task == "causal-lm":
        model, tokenizer, _ = load_model(model_dir, dtype=torch.float32)
        texts, labels = (load_texts(data) if data is not None else stdlib_docstrings("eval")), None
    elif classifier:
        if data is None:
            raise WeightkitError(f"{verb} on a classifier needs --data with 'text' and 'label' records")
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32
        )
        tokenizer = load_tokenizer(model_dir)
        texts, raw_labels = load_examples(data)
        if raw_labels is None:
            raise WeightkitError(f"{data}: a classifier's loss needs a 'label' in every record")
        ids = model.config.label2id
        unknown = sorted({str(v) for v in raw_labels} - set(ids))
        if unknown:
            raise WeightkitError(f"{data}: labels {unknown[:5]} are not the model's (config.label2id: {ids})")
        labels = [ids[str(v)] for v in raw_labels][:examples]
    else:
        raise WeightkitError(
            f"{model_dir} is a {task} model without a loss of its own; {verb} needs a causal LM (its texts' "
            "loss) or a sequence classifier (its labels' cross-entropy)"
        )
    if tokenizer is None:
        raise WeightkitError(f"{model_dir} has no tokenizer files; {verb} needs the model's tokenizer")
    batches = make_batches(tokenizer, texts[:examples], labels, batch_size=batch_size, max_length=max_length)
    return model.to(device).eval(), batches


def hessian_run(
    model_path: str | Path,
    data: str | Path | None,
    k: int = 5,
    device: str | torch.device | None = None,
    *,
    examples: int = 8,
    batch_size: int = 8,
    max_length: int = 128,
    iterations: int = 30,
    probes: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """The top ``k`` Hessian eigenvalues (Lanczos) and the Hessian's eigenvalue density (SLQ) of the model's
    loss on the first ``examples`` examples of ``data`` (default for a causal LM: held-out standard-library
    docstrings), w.r.t. every parameter, in float32 on ``device``.

    Attention runs in transformers' eager implementation: the fused scaled-dot-product kernels have no
    second derivative. Memory: the graph of one backward pass plus ``iterations`` vectors of the parameter
    count (float32): for ``iterations=30``, 120 bytes per parameter.

    Returns:
        ``{"eigenvalues": [k floats, largest first], "density": [(eigenvalue, density) ...], "sigma",
        "loss", "parameters", "examples", "iterations", "probes", "seconds"}``.
    """
    start = time.perf_counter()
    model, batches = _model_and_batches(
        model_path, data, examples=examples, batch_size=batch_size, max_length=max_length,
        device=resolve_device(device), verb="the Hessian",
    )  # fmt: skip
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    # One operator (one graph) serves both: the products of Lanczos and of every SLQ probe.
    operator = hessian_operator(model, lambda m: mean_loss(m, batches))
    on = {"dtype": operator.dtype, "device": operator.device}
    top = lanczos(operator, operator.dim, k=k, iterations=iterations, seed=seed, **on)
    density = slq_density(operator, operator.dim, probes=probes, iterations=iterations, seed=seed, **on)
    return {
        "eigenvalues": top.tolist(),
        "density": density.curve(),
        "sigma": density.sigma,
        "loss": operator.loss,
        "parameters": operator.dim,
        "examples": sum(b["input_ids"].shape[0] for b in batches),
        "iterations": iterations,
        "probes": probes,
        "seconds": time.perf_counter() - start,
    }


def barrier_run(
    model_a: str | Path,
    model_b: str | Path,
    data: str | Path | None,
    align: bool,
    device: str | torch.device | None = None,
    *,
    points: int = 11,
    examples: int = 32,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """The loss along the straight line from checkpoint ``model_a`` to ``model_b`` and its barrier
    (:func:`~weightkit.inspect.hessian.loss_barrier`), on the first ``examples`` examples of ``data``; with
    ``align``, again after permuting ``model_b``'s attention heads and MLP neurons to match ``model_a``
    (:func:`~weightkit.merge.align.align_checkpoint`, as ``weightkit align`` does; the aligned copy lives in a
    temporary directory).

    Returns:
        ``{"before": BarrierResult, "after": BarrierResult or None, "alignment": align_checkpoint's summary
        (``layers``, ``seconds`` ...) or None}``.

    Raises:
        WeightkitError: checkpoints of other architectures or shapes (by tensor name), or what loading,
            aligning or the barrier refuse.
    """
    device = resolve_device(device)
    kwargs = {"examples": examples, "batch_size": batch_size, "max_length": max_length, "device": device}
    model, batches = _model_and_batches(model_a, data, **kwargs, verb="the loss barrier")
    state_a = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def state_of(path: str | Path) -> dict[str, Tensor]:
        other, _ = _model_and_batches(path, data, **kwargs, verb="the loss barrier")
        if type(other) is not type(model):
            raise WeightkitError(
                f"{path} is a {type(other).__name__}, {model_a} a {type(model).__name__}: there is no "
                "straight path between them"
            )
        return other.state_dict()

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(mean_loss(m, batches))

    before = loss_barrier(model, state_a, state_of(model_b), loss, points=points)
    after, alignment = None, None
    if align:
        with tempfile.TemporaryDirectory(prefix="weightkit-barrier-") as tmp:
            alignment = align_checkpoint(
                model_a, model_b, Path(tmp) / "aligned", progress=False, seed=seed, device=device
            )
            after = loss_barrier(model, state_a, state_of(Path(tmp) / "aligned"), loss, points=points)
    return {"before": before, "after": after, "alignment": alignment}


def intrinsic_dimension_run(
    model_path: str | Path,
    data: str | Path | None,
    dims: Sequence[int] | None = None,
    train: TrainConfig | None = None,
    *,
    bounds: tuple[int, int] | None = None,
    full_lr: float = 1e-4,
    said: bool = False,
    eval_data: str | Path | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The intrinsic dimension ``d90`` of fine-tuning the model on ``data``, with the curve behind it.

    For each ``d`` tried, a fresh copy of the model gets a DID (or with ``said``, SAID) subspace of ``d``
    numbers (:class:`~weightkit.adapt.subspace.SubspaceConfig`, every module with parameters, the new
    classification head included, so exactly ``d`` numbers train) and ``weightkit.adapt``'s trainer trains
    it with ``train`` (its ``lr`` is the subspace's); the baseline is a full fine-tune of every weight
    (``weightkit train``'s AdamW at ``full_lr``, the same steps, data and seed). Every run starts from the
    same weights (the new head drawn from ``train.seed``) and is scored on the same held-out examples
    (``eval_data``, or ``train.eval_fraction`` of ``data``).

    The score: accuracy for an encoder trained as a classifier on ``text``/``label`` records (the threshold is
    90% of the full fine-tune's accuracy, as in the papers); for a causal LM, the negative held-out loss,
    with the model before fine-tuning as the reference (the threshold is 90% of the way from its loss to the
    full fine-tune's: :mod:`weightkit.inspect.intrinsic`).

    Args:
        model_path: the model directory (a causal LM, or a text encoder trained as a classifier).
        data, eval_data: example files (:func:`weightkit.runtime.training.prepare_training`).
        dims: the dimensions to sweep (:func:`~weightkit.inspect.intrinsic.d90_sweep`, the papers' way), or
        bounds: ``(low, high)`` for :func:`~weightkit.inspect.intrinsic.d90_bisect` instead; exactly one.
        train: steps, subspace learning rate, batch size, seed (default ``TrainConfig(lr=3e-3)``: Fastfood
            moves every tensor by a unit-length column per coordinate, so small tensors (biases, norms) are
            sensitive; on the tiny test classifier lr 3e-2 already diverged at d = 1024).
        full_lr: the full fine-tune's learning rate.
        said: SAID (a learned scale per tensor, counted in ``d``) instead of DID.
        device: where to train (default: the GPU when there is one).

    Returns:
        ``{"intrinsic": IntrinsicDimension, "metric": "accuracy" or "negative eval loss", "full": the full
        fine-tune's evaluation, "runs": [{"d", "score", "eval", "trainable_parameters"} ...], "seconds"}``.
    """
    if (dims is None) == (bounds is None):
        raise WeightkitError("give either dims (a sweep) or bounds (a bisection), not both or neither")
    train = train if train is not None else TrainConfig(lr=3e-3)
    start = time.perf_counter()
    device = resolve_device(device)
    setup = prepare_training(
        Path(model_path), train, verb="weightkit inspect --intrinsic-dim", device=device, data=data,
        eval_data=eval_data, dtype=torch.float32,
    )  # fmt: skip
    classification = setup.labels is not None
    metric = "accuracy" if classification else "negative eval loss"

    def score(evaluation: dict[str, float]) -> float:
        return evaluation["accuracy"] if classification else -evaluation["eval_loss"]

    runs = []
    with tempfile.TemporaryDirectory(prefix="weightkit-intrinsic-") as tmp:
        full = train_model(
            model_path, Path(tmp) / "full", dataclasses.replace(train, lr=full_lr), data=data,
            eval_data=eval_data, device=device, progress=False,
        )["eval"]  # fmt: skip
        reference = 0.0
        if not classification:  # the loss before fine-tuning: the gain is measured from there
            eval_batches = make_batches(
                setup.tokenizer, setup.eval_texts, None, batch_size=train.batch_size,
                max_length=train.max_length,
            )  # fmt: skip
            reference = score(evaluate(setup.model, eval_batches, classification=False))

        def score_at(d: int) -> float:
            model = copy.deepcopy(setup.model)
            adapt(model, SubspaceConfig(dim=d, said=said, seed=train.seed))
            summary = train_adapter(
                model, setup.tokenizer, setup.texts, setup.labels, Path(tmp) / f"d{d}", train,
                eval_texts=setup.eval_texts, eval_labels=setup.eval_labels, progress=False,
            )  # fmt: skip
            runs.append(
                {"d": d, "score": score(summary["eval"]), "eval": summary["eval"],
                 "trainable_parameters": summary["trainable_parameters"]}
            )  # fmt: skip
            return runs[-1]["score"]

        if dims is not None:
            result: IntrinsicDimension = d90_sweep(score_at, score(full), dims, reference=reference)
        else:
            low, high = bounds
            result = d90_bisect(score_at, score(full), low=low, high=high, reference=reference)
    return {
        "intrinsic": result,
        "metric": metric,
        "full": full,
        "runs": sorted(runs, key=lambda run: run["d"]),
        "seconds": time.perf_counter() - start,
    }
