"""The training loop the verbs share (``weightkit adapt`` and ``weightkit train``): batches, the optimizer
with a linear warm-up, gradient clipping, NaN/Inf checks, evaluation, checkpoints and
DistributedDataParallel; and :func:`prepare_training`, the model and examples both verbs start from.

What is trained and how it is saved belong to the verb: :func:`train_loop` takes the parameters to update
(and optionally the optimizer over them) and a ``save_checkpoint`` function, and returns; the verb saves
its result.

- Examples are texts, with a class label each (classification) or none (causal language modelling, the
  labels are the input ids). Each epoch reshuffles them (from ``seed``) and tokenizes them into batches.
- The optimizer is AdamW (no weight decay) unless the verb gives one; the learning rate rises linearly over
  ``warmup_steps`` then stays constant. Three kinds of optimizer step:

  - gradient (AdamW, AdamP, GaLore): backward, gradients clipped to norm 1.0, ``optimizer.step()``;
  - in backward (``optimizer.per_layer``: GaLore's per-layer mode): each parameter is updated in its
    gradient hook during backward, so the gradients are neither clipped nor checked (the loss is);
  - forward only (``optimizer.forward_only``: zeroth-order SGD): ``optimizer.step(closure)`` evaluates the
    loss itself, with dropout off (the probes of one step must see the same function); an optimizer that
    meets a non-finite loss does not apply that step.
- An evaluation on the held-out examples after every epoch and at the end.
- A checkpoint every ``save_every`` steps (``<checkpoints>/checkpoint-<step>``). Each holds, beside what
  the verb saves, the loop's state (``trainer_state.json`` + ``trainer_state.safetensors``: the trained
  parameters unless the verb saves the whole model, the optimizer's and the warm-up's state, the step, the
  data order, every process's random state and the run's settings), so ``resume=True`` continues from the
  newest one exactly as the run would have gone on: the same final parameters, bit for bit. A resumed run
  must have the settings the checkpoint was trained with (each is compared, a difference is refused by
  name).
- Ctrl-C (SIGINT) stops training at the end of the step it is in and saves the state to
  ``<checkpoints>/interrupted``, a checkpoint like the others (a second Ctrl-C stops at once, saving
  nothing if an update was under way); a ``KeyboardInterrupt`` then says where it is. Under torchrun,
  Ctrl-C ends every process as before (resume from the last ``checkpoint-<step>``).
- A loss or gradient that is NaN/Inf stops training before the bad step is applied: the state as it was
  (the last good one) is saved to ``<checkpoints>/last-good`` and the error names the step.
- The model trains where it is (move it to its device first). Under ``torchrun --nproc-per-node N`` each
  process takes every N-th batch, DistributedDataParallel averages the gradients (a forward-only optimizer
  keeps the processes in step itself: ``DistributedZerothOrderSGD``), and every process stops on a NaN/Inf
  that any of them meets (the losses are shared before anyone steps back from the collectives); only
  process 0 writes checkpoints and shows progress. At the end the processes compare their trained
  parameters (a SHA-256 of their bytes) and refuse to return if they differ.
"""

import dataclasses
import hashlib
import json
import math
import random
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from weightkit.arch import model_task
from weightkit.data import load_texts, stdlib_docstrings, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.progress import console
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.runtime.distributed import barrier, gather_scalars, init_distributed

__all__ = [
    "TrainConfig",
    "Schedule",
    "TrainingSetup",
    "prepare_training",
    "load_examples",
    "split_examples",
    "make_batches",
    "forward_batch",
    "evaluate",
    "first_step_lr",
    "checkpoints_dir",
    "latest_checkpoint",
    "train_loop",
]

# The names PEFT gives a sequence classifier's head (PeftModelForSequenceClassification's modules_to_save).
CLASSIFIER_HEADS = ("classifier", "score")
# The loop's own part of a checkpoint directory, and the checkpoint Ctrl-C writes.
TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"
INTERRUPTED = "interrupted"
# Version of the loop's checkpoint files (1: AdamW's state only); a tensor's place in the JSON.
STATE_FORMAT = 2
_TENSOR = "__tensor__"


@dataclass
class TrainConfig:
    """How long and how fast to train.

    Attributes:
        max_steps: optimizer steps; ``None`` trains ``epochs`` full passes.
        epochs: passes over the training data (when ``max_steps`` is ``None``).
        lr: AdamW learning rate (adapters like 1e-4 to 1e-3; full-model subspace methods more).
        batch_size: examples per step (per process under torchrun).
        max_length: tokens per example (longer texts are cut).
        warmup_steps: linear learning-rate warm-up.
        eval_fraction: share of the examples held out for evaluation (when no eval file is given).
        save_every: save a checkpoint every this many steps (0: only at the end).
        seed: shuffling, the held-out split and the adapter's random initialisation.
    """

    max_steps: int | None = None
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    warmup_steps: int = 0
    eval_fraction: float = 0.1
    save_every: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise WeightkitError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise WeightkitError("epochs and batch_size must be at least 1, max_length at least 2")
        if not self.lr > 0:
            raise WeightkitError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            raise WeightkitError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


class Schedule(Protocol):
    """A method's training-time part (IncreLoRA's controller): a loss term and a hook after each step."""

    def regularization(self) -> Tensor:
        """Added to the loss before ``backward()``."""

    def step(self) -> Any:
        """Called after every optimizer step."""


@dataclass
class TrainingSetup:
    """What a training verb starts from (:func:`prepare_training`).

    Attributes:
        model: the model, on its device, in training mode's dtype.
        tokenizer: its tokenizer.
        task: ``"causal-lm"`` (trained on the texts) or ``"encoder"`` (trained as a classifier).
        texts, labels: the training examples (``labels``: class ids, for a classifier).
        eval_texts, eval_labels: the held-out examples.
        head: a classifier's new head modules (``classifier`` or ``score``); none for a causal LM.
        label_names: a classifier's label names, by class id.
    """

    model: nn.Module
    tokenizer: Any
    task: str
    texts: list[str]
    labels: list[int] | None
    eval_texts: list[str]
    eval_labels: list[int] | None
    head: list[str]
    label_names: list[str] | None


def prepare_training(
    model_dir: Path,
    config: TrainConfig,
    *,
    verb: str,
    device: torch.device,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    dtype: torch.dtype | None = None,
    weights_from: Path | None = None,
    allow_pickle: bool = False,
) -> TrainingSetup:
    """Load a Hugging Face model directory and the examples to train it on, as ``weightkit adapt`` and
    ``weightkit train`` do.

    Causal LMs (any transformers knows) train on the causal-LM loss of the texts (default: docstrings of
    Python's standard library; labels in the data are not used). Encoders need a ``.jsonl``/``.json`` file
    whose records have ``text`` and ``label``: the model loads as ``AutoModelForSequenceClassification``
    with a new classification head (class ids in sorted label order, the names in ``config.id2label``).
    Without ``eval_data``, ``config.eval_fraction`` of the examples is held out (drawn by ``config.seed``).
    Joins the torchrun process group, seeds torch with ``config.seed`` (the new head's initialisation) and
    moves the model to ``device``.

    Args:
        model_dir: the model directory (its config, tokenizer and, unless ``weights_from``, weights).
        config: the run's training settings.
        verb: the command, for messages (``"weightkit adapt"``).
        device: where training runs.
        data, eval_data: example files.
        dtype: the weights' dtype (``None``: the checkpoint's).
        weights_from: load the weights from this directory instead (a checkpoint being resumed).
        allow_pickle: also read ``.bin``/``.pt`` pickle checkpoints (trusted files only).

    Raises:
        WeightkitError: not a model directory; neither a causal LM nor a text encoder; an encoder without
            labelled data, quantized, or without a head PEFT knows; no tokenizer.
    """
    from transformers import AutoModelForSequenceClassification

    from weightkit.models import load_model, load_tokenizer

    texts, labels = load_examples(data) if data is not None else (stdlib_docstrings("calib"), None)
    eval_texts, eval_labels = load_examples(eval_data) if eval_data is not None else (None, None)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise WeightkitError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    task = model_task(json.loads(config_file.read_text()))
    if task not in ("causal-lm", "encoder"):
        raise WeightkitError(
            f"{model_dir} is a {task} model; {verb} trains causal LMs on text and text encoders as "
            "classifiers. Train it in your own loop with the Python API (weightkit.adapt, weightkit.train)"
        )
    init_distributed(device)
    torch.manual_seed(config.seed)  # a new classification head's initialisation (and an adapter's)
    head, label_names = [], None
    if task == "causal-lm":
        labels = eval_labels = None  # a decoder learns the texts
        model, _, _ = load_model(weights_from or model_dir, dtype=dtype, allow_pickle=allow_pickle)
    else:
        # transformers, which loads the classifier, would give its own layers (no QuantizedLinear).
        refuse_quantized(model_dir, verb=f"{verb} on an encoder", instead="train the full-precision model")
        if labels is None:
            raise WeightkitError(
                "an encoder is trained as a classifier: give --data a .jsonl/.json file whose records "
                "have 'text' and 'label'"
            )
        label_names = sorted({str(v) for v in labels + (eval_labels or [])})
        ids = {v: i for i, v in enumerate(label_names)}
        labels = [ids[str(v)] for v in labels]
        eval_labels = [ids[str(v)] for v in eval_labels] if eval_labels is not None else None
        model = AutoModelForSequenceClassification.from_pretrained(
            weights_from or model_dir, id2label=dict(enumerate(label_names)), label2id=ids,
            local_files_only=True, dtype=dtype or "auto",
        )  # fmt: skip
        head = [n for n in CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)]
        if not head:  # PEFT would neither train nor save another head
            raise WeightkitError(
                f"{type(model).__name__} has no classification head named {' or '.join(CLASSIFIER_HEADS)}"
            )
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise WeightkitError(f"{model_dir} has no tokenizer files; training needs the model's tokenizer")
    model.to(device)
    if eval_texts is None:
        texts, labels, eval_texts, eval_labels = split_examples(
            texts, labels, config.eval_fraction, config.seed
        )
    return TrainingSetup(model, tokenizer, task, texts, labels, eval_texts, eval_labels, head, label_names)


def load_examples(path: str | Path) -> tuple[list[str], list[Any] | None]:
    """Texts and, when every record of a ``.jsonl``/``.json`` file has one, their ``label`` values."""
    texts = load_texts(path)
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        return texts, None
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else None
    records = [json.loads(line) for line in lines if line.strip()] if lines is not None else None
    if records is None:
        value = json.loads(path.read_text())
        records = value if isinstance(value, list) else []
    labels = [r.get("label") if isinstance(r, dict) else None for r in records]
    if not labels or any(label is None for label in labels) or len(labels) != len(texts):
        return texts, None
    return texts, labels


def split_examples(
    texts: list[str], labels: list | None, fraction: float, seed: int
) -> tuple[list[str], list | None, list[str], list | None]:
    """Hold out ``fraction`` of the examples (at least one, never all), drawn by ``seed``:
    ``(train_texts, train_labels, eval_texts, eval_labels)``, each part in the original order."""
    n = len(texts)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    train_idx, eval_idx = sorted(order[n_eval:]), sorted(order[:n_eval])

    def pick(values, indices):
        return [values[i] for i in indices] if values is not None else None

    return pick(texts, train_idx), pick(labels, train_idx), pick(texts, eval_idx), pick(labels, eval_idx)


def make_batches(
    tokenizer, texts: list[str], labels: list[int] | None, *, batch_size: int, max_length: int
) -> list[dict[str, Tensor]]:
    """Tokenized batches with ``labels``: the class ids, or for language modelling the input ids with
    padding set to -100 (ignored by the loss)."""
    batches = tokenize_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    start = 0
    for batch in batches:
        n = batch["input_ids"].shape[0]
        if labels is None:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        else:
            batch["labels"] = torch.tensor(labels[start : start + n], dtype=torch.long)
        start += n
    return batches


def forward_batch(model: nn.Module, batch) -> Any:
    """Run ``model`` on one batch: a dict is passed as keyword arguments, anything else positionally.
    Tensors are moved to the model's device."""
    device = next(model.parameters()).device
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
    return model(batch.to(device) if isinstance(batch, Tensor) else batch)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], *, classification: bool) -> dict[str, float]:
    """Eval loss (token-weighted for language modelling) and perplexity, or accuracy and loss."""
    was_training = model.training
    model.eval()
    total_loss, total_weight, correct = 0.0, 0, 0
    for batch in batches:
        out = forward_batch(model, batch)
        if classification:
            weight = batch["labels"].shape[0]
            correct += int((out.logits.argmax(-1).cpu() == batch["labels"]).sum())
        else:
            weight = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(out.loss) * weight
        total_weight += weight
    model.train(was_training)
    loss = total_loss / max(total_weight, 1)
    if classification:
        return {"eval_loss": loss, "accuracy": correct / max(total_weight, 1)}
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: step ``s`` (from 0) runs at ``(s + 1) / (warmup_steps + 1)`` of ``lr``, then ``lr``."""
    return min(1.0, (step + 1) / (max(warmup_steps, 0) + 1))


def first_step_lr(config: TrainConfig) -> float:
    """The learning rate of the first optimizer step: ``lr`` scaled by the warm-up."""
    return config.lr * _warmup_factor(0, config.warmup_steps)


def checkpoints_dir(out_dir: str | Path) -> Path:
    """Where the checkpoints of a run saving its result to ``out_dir`` go: ``<out_dir>-checkpoints``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + "-checkpoints")


def latest_checkpoint(checkpoints: Path) -> Path:
    """The newest checkpoint in ``checkpoints`` that training can resume from: ``checkpoint-<step>`` or
    ``interrupted``, whichever holds the most steps (``last-good`` is left out: it leads to a NaN).

    Raises:
        WeightkitError: there is none.
    """
    found = [d for d in [*checkpoints.glob("checkpoint-*"), checkpoints / INTERRUPTED] if _has_state(d)]
    if not found:
        raise WeightkitError(f"nothing to resume: {checkpoints} holds no checkpoint with a trainer state")
    # At equal steps (Ctrl-C right after a checkpoint) the two hold the same state.
    return max(found, key=lambda d: (json.loads((d / TRAINER_STATE_JSON).read_text())["step"], d.name))


def _has_state(checkpoint: Path) -> bool:
    return (checkpoint / TRAINER_STATE_JSON).is_file() and (checkpoint / TRAINER_STATE_TENSORS).is_file()


def train_loop(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    labels: list[int] | None,
    config: TrainConfig,
    *,
    params: list[nn.Parameter],
    save_checkpoint: Callable[[Path, dict[str, Any], dict[str, dict[str, Tensor]]], None],
    checkpoints: Path,
    optimizer: torch.optim.Optimizer | None = None,
    model_in_checkpoint: bool = False,
    eval_texts: list[str] = (),
    eval_labels: list[int] | None = None,
    schedule: Schedule | None = None,
    settings: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``params`` of ``model`` on the examples, where the model is.

    Args:
        model: the model (its parameters' device is where training runs).
        tokenizer: its tokenizer.
        texts, labels: training examples; ``labels`` (class ids) for classification, ``None`` for causal LM.
        config: steps, learning rate, batch size ...
        params: what the optimizer updates (requiring grad).
        save_checkpoint: ``save_checkpoint(where, json_files, tensor_files)`` writes the trained state and
            the loop's files (``{file name: JSON value}``, ``{file name: {name: tensor}}``) to a new directory
            (replacing one that exists); called on process 0 only, for ``<checkpoints>/checkpoint-<step>``,
            ``<checkpoints>/last-good`` and ``<checkpoints>/interrupted``.
        checkpoints: the directory checkpoints go to.
        optimizer: an optimizer over exactly ``params``, built with ``config.lr`` (default: AdamW without
            weight decay). Its kind of step is read from its ``per_layer`` and ``forward_only`` attributes
            (module docstring).
        model_in_checkpoint: ``save_checkpoint`` writes the whole model, the trained parameters exactly as
            they are: the loop then keeps no copy of its own, and with ``resume`` the model given must have
            been loaded from :func:`latest_checkpoint` of ``checkpoints``.
        eval_texts, eval_labels: held-out examples, evaluated after every epoch and at the end.
        schedule: a method's training-time part (IncreLoRA's controller): its ``regularization()`` is added
            to the loss and its ``step()`` runs after every optimizer step (gradient optimizers only). Under
            DDP it may leave some parameters out of a step (unused parameters are allowed then). Its state is
            not saved: a run with one cannot resume.
        settings: what else the result depends on (the method and its options, the base model), JSON
            values; saved with every checkpoint and compared on resume.
        resume: continue from :func:`latest_checkpoint` of ``checkpoints``.
        progress: show a progress bar (process 0).

    Returns:
        ``{"steps", "train_loss" (mean of the last 10 steps over all processes), "eval": {...} (the final
        evaluation), "history": [...] (each evaluation with its step)}``, and under torchrun
        ``"replicas": {"processes", "sha256"}``, the digest every process's trained parameters share.

    Raises:
        WeightkitError: no training examples; an optimizer over other parameters; a per-layer optimizer
            under torchrun; a NaN/Inf loss or gradient on any process (after the last good state is saved),
            on every process; ``resume`` without a checkpoint, with other settings than the checkpoint's
            (named) or with a ``schedule``; processes whose trained parameters differ at the end.
        KeyboardInterrupt: Ctrl-C, after the state is saved to ``<checkpoints>/interrupted`` (its message
            says so).
    """
    if not texts:
        raise WeightkitError("no training examples")
    if not params:
        raise WeightkitError("nothing to train: no trainable parameters")
    device = next(model.parameters()).device
    rank, world = init_distributed(device)
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    kind = _step_kind(optimizer, params, world, schedule)
    classification = labels is not None
    kwargs = {"batch_size": config.batch_size, "max_length": config.max_length}
    eval_batches = make_batches(tokenizer, list(eval_texts), eval_labels, **kwargs) if eval_texts else []
    order_rng = random.Random(config.seed)
    n_batches = math.ceil(len(texts) / config.batch_size)
    steps = config.max_steps
    total_steps = steps if steps is not None else config.epochs * math.ceil(n_batches / world)
    param_names = _parameter_names(model, params)
    # The optimizer's state_dict numbers the parameters in its groups' order.
    optimizer_names = _parameter_names(
        model, [p for group in optimizer.param_groups for p in group["params"]]
    )
    run_settings = _run_settings(config, world, device, texts, labels, settings)

    def batches_for_epoch() -> list[dict]:
        order = list(range(len(texts)))
        order_rng.shuffle(order)
        shuffled = [texts[i] for i in order]
        shuffled_labels = [labels[i] for i in order] if labels is not None else None
        return make_batches(tokenizer, shuffled, shuffled_labels, **kwargs)[rank::world]

    saved, saved_tensors = None, None
    if resume:
        if schedule is not None:
            raise WeightkitError(
                "this method's training-time schedule (IncreLoRA's) is not saved: it cannot resume"
            )
        where = latest_checkpoint(checkpoints)
        saved = json.loads((where / TRAINER_STATE_JSON).read_text())
        if saved.get("format") != STATE_FORMAT:
            raise WeightkitError(
                f"cannot resume from {where}: its trainer state was written by an older weightkit "
                f"(format {saved.get('format', 1)}, this one reads {STATE_FORMAT}); run without --resume"
            )
        saved_tensors = load_file(where / TRAINER_STATE_TENSORS)
        _check_settings(saved["settings"], run_settings, saved["params"], param_names, where)
        if not model_in_checkpoint:
            with torch.no_grad():
                for name, param in zip(param_names, params, strict=True):
                    param.copy_(saved_tensors[f"param.{name}"])

    trained = model
    if world > 1 and kind != "forward-only":
        trained = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=schedule is not None,
        )
    warmup = config.warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_factor(s, warmup))
    # Where training stands: steps taken, the order's random state before this epoch's shuffle, the
    # batches of this epoch already trained on.
    step, losses, history, epoch_batches, position = 0, [], [], [], 0
    epoch_order = order_rng.getstate()
    if saved is not None:
        optimizer.load_state_dict(_unpack_optimizer(saved["optimizer"], saved_tensors, optimizer_names))
        lr_schedule.load_state_dict(saved["lr_schedule"])
        step, losses, history, position = saved["step"], saved["losses"], saved["history"], saved["position"]
        epoch_order = _random_state(saved["epoch_order"])
        order_rng.setstate(epoch_order)
        epoch_batches = batches_for_epoch()
        _set_rng_state(saved_tensors, rank, device)
    boundary_rng = _rng_state(device)  # the random state at the end of the last step taken

    def save(where: Path) -> None:
        # Every process's random state is gathered, so every process must call this at the same point.
        rng_states = _gather(boundary_rng, world)
        if rank != 0:
            return
        tensors = {}
        if not model_in_checkpoint:
            tensors = {f"param.{name}": param for name, param in zip(param_names, params, strict=True)}
        optimizer_state = _pack_optimizer(optimizer.state_dict(), optimizer_names, tensors)
        for process, states in enumerate(rng_states):
            tensors.update({f"rng.{process}.{key}": value for key, value in states.items()})
        state = {
            "format": STATE_FORMAT, "step": step, "position": position, "epoch_order": epoch_order,
            "losses": losses[-10:], "history": history, "settings": run_settings, "params": param_names,
            "optimizer": optimizer_state, "lr_schedule": lr_schedule.state_dict(),
        }  # fmt: skip
        save_checkpoint(where, {TRAINER_STATE_JSON: state}, {TRAINER_STATE_TENSORS: tensors})

    def stop(what: str, step: int) -> WeightkitError:
        # Every process gets here together: process 0 saves the untouched state, the others wait for it
        # (torchrun stops all processes as soon as one exits with an error).
        optimizer.zero_grad(set_to_none=True)
        save(checkpoints / "last-good")
        barrier()
        return WeightkitError(
            f"{what} at step {step}; training stopped before that step. The last good state is in "
            f"{checkpoints / 'last-good'} (try a lower --lr)"
        )

    def check(step_losses: list[float]) -> None:
        bad = [(r, value) for r, value in enumerate(step_losses) if not math.isfinite(value)]
        if bad:
            where = [f"{value} on process {r}" if world > 1 else str(value) for r, value in bad]
            raise stop(f"the loss is {', '.join(where)}", step + 1)

    model.train(kind != "forward-only")  # zeroth-order probes of one step must see one function: no dropout
    updating = False  # between the first change of a parameter and the step's end: no state to save
    with _Bar(total_steps, step, enabled=progress and rank == 0) as bar, _CtrlC(world == 1) as ctrl_c:
        try:
            while step < total_steps:
                if ctrl_c.pressed:
                    raise KeyboardInterrupt
                if position == len(epoch_batches):
                    if step and eval_batches and steps is None:
                        history.append(
                            {"step": step, **evaluate(model, eval_batches, classification=classification)}
                        )
                    order_state = order_rng.getstate()
                    epoch_order, epoch_batches, position = order_state, batches_for_epoch(), 0
                batch = epoch_batches[position]
                if kind == "forward-only":
                    updating = True
                    # Applied only when the loss is finite on this process (and, distributed, on all).
                    loss = optimizer.step(lambda batch=batch: forward_batch(model, batch).loss)
                    step_losses = gather_scalars(torch.as_tensor(loss, dtype=torch.float32, device=device))
                    check(step_losses)
                else:
                    loss = forward_batch(trained, batch).loss
                    if schedule is not None:
                        loss = loss + schedule.regularization()
                    # Shared before backward(): a process that stopped alone would leave the others waiting
                    # in DDP's gradient all-reduce.
                    step_losses = gather_scalars(loss)
                    check(step_losses)
                    updating = kind == "in-backward"
                    loss.backward()
                    if kind == "gradient":
                        # DDP's gradients are averaged over the processes: every process sees the same norm.
                        grad_norm = nn.utils.clip_grad_norm_(params, 1.0)
                        if not torch.isfinite(grad_norm):
                            raise stop("the gradient is not finite", step + 1)
                    updating = True
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()
                if schedule is not None:
                    schedule.step()
                step, position = step + 1, position + 1
                losses.append(sum(step_losses) / world)
                boundary_rng = _rng_state(device)
                updating = False
                bar.advance(losses[-1])
                if config.save_every and step % config.save_every == 0 and step < total_steps:
                    save(checkpoints / f"checkpoint-{step}")
        except KeyboardInterrupt:
            if world > 1 or updating:
                raise
            save(checkpoints / INTERRUPTED)
            raise KeyboardInterrupt(
                f"training stopped after step {step} of {total_steps}; what it trained so far is saved in "
                f"{checkpoints / INTERRUPTED}: run the same command with --resume (resume=True) to continue"
            ) from None
    final = evaluate(model, eval_batches, classification=classification) if eval_batches else {}
    history.append({"step": step, **final})
    summary = {
        "steps": step,
        "train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "eval": final,
        "history": history,
    }
    if world > 1:
        summary["replicas"] = {"processes": world, "sha256": _same_on_every_process(params, world)}
    return summary


def _step_kind(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], world: int, schedule) -> str:
    """``"gradient"``, ``"in-backward"`` or ``"forward-only"`` (module docstring), after checking that the
    optimizer fits the run."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if held != {id(p) for p in params}:
        raise WeightkitError("the optimizer must hold exactly the parameters being trained")
    kind = "forward-only" if getattr(optimizer, "forward_only", False) else "gradient"
    kind = "in-backward" if getattr(optimizer, "per_layer", False) else kind
    if kind == "in-backward" and world > 1:
        raise WeightkitError(
            "a per-layer optimizer updates each parameter during backward, before DistributedDataParallel "
            "averages the gradients: it cannot train under torchrun"
        )
    if schedule is not None and kind != "gradient":
        raise WeightkitError(f"a training-time schedule needs a gradient optimizer, not a {kind} one")
    return kind


def _same_on_every_process(params: list[nn.Parameter], world: int) -> str:
    """The SHA-256 of the trained parameters' bytes, checked to be every process's.

    Raises:
        WeightkitError: the processes hold different parameters.
    """
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    digests = _gather(digest.hexdigest(), world)
    if len(set(digests)) > 1:
        raise WeightkitError(
            "after training the processes hold different parameters (SHA-256 by process: "
            f"{', '.join(d[:12] for d in digests)})"
        )
    return digests[0]


def _parameter_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """Each trained parameter's name in ``model``: how the checkpoint's tensors find their place."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


def _run_settings(config, world, device, texts, labels, settings) -> dict[str, Any]:
    """Everything a resumed run must share with the checkpoint, as read back from JSON."""
    examples = hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest()
    values = {
        # save_every only decides when checkpoints are written: a resumed run may change it.
        **{k: v for k, v in dataclasses.asdict(config).items() if k != "save_every"},
        "processes": world,
        "device": device.type,
        "training examples (sha256)": examples,
        **(settings or {}),
    }
    return json.loads(json.dumps(values, default=str))


def _check_settings(saved: dict, current: dict, saved_params: list, params: list[str], where: Path) -> None:
    """Refuse to resume from ``where`` with other settings or other trained parameters than it has."""
    for key in [*current, *(k for k in saved if k not in current)]:  # the method before its options
        if saved.get(key) != current.get(key):
            raise WeightkitError(
                f"cannot resume from {where}: it was trained with {key} = {saved.get(key)!r}, this run has "
                f"{current.get(key)!r}; run with the checkpoint's settings, or without --resume"
            )
    if saved_params != params:
        raise WeightkitError(f"cannot resume from {where}: it trained other parameters than this run's")


def _pack_optimizer(state_dict: dict, names: list[str], tensors: dict[str, Tensor]) -> Any:
    """An optimizer's ``state_dict`` as JSON, its tensors moved to ``tensors`` (``optimizer/...`` keys).

    Any optimizer's: per-parameter state (keyed by parameter name instead of number), the groups, and
    whatever else it saves (zeroth-order SGD's seed and step count). Tuples come back as lists."""
    state_dict = {**state_dict, "state": {names[i]: v for i, v in state_dict["state"].items()}}

    def pack(value: Any, key: str) -> Any:
        if isinstance(value, Tensor):
            tensors[key] = value
            return {_TENSOR: key}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise WeightkitError(
                    f"cannot save the optimizer's state: {key} has keys that are not strings"
                )
            return {k: pack(v, f"{key}/{k}") for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [pack(v, f"{key}/{i}") for i, v in enumerate(value)]
        return value

    return pack(state_dict, "optimizer")


def _unpack_optimizer(value: Any, tensors: dict[str, Tensor], names: list[str]) -> dict:
    """The ``state_dict`` :func:`_pack_optimizer` saved, for an optimizer whose parameters are ``names``."""

    def unpack(value: Any) -> Any:
        if isinstance(value, dict):
            return tensors[value[_TENSOR]] if _TENSOR in value else {k: unpack(v) for k, v in value.items()}
        return [unpack(v) for v in value] if isinstance(value, list) else value

    state_dict = unpack(value)
    number = {name: i for i, name in enumerate(names)}
    return {**state_dict, "state": {number[name]: v for name, v in state_dict["state"].items()}}


def _random_state(value: list) -> tuple:
    """A ``random.Random`` state read back from JSON (its lists were tuples)."""
    version, internal, gauss = value
    return version, tuple(internal), gauss


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """torch's random state where training draws (dropout): the CPU's, and the GPU's when training there."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict[str, Tensor], rank: int, device: torch.device) -> None:
    """Put back process ``rank``'s random state from a checkpoint's tensors (``rng.<rank>.<generator>``)."""
    torch.set_rng_state(tensors[f"rng.{rank}.torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"], device)


def _gather(value: Any, world: int) -> list[Any]:
    """Every process's ``value``, by rank (a collective under DDP)."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


class _CtrlC:
    """Within the block, Ctrl-C (SIGINT) sets ``pressed`` instead of raising, so training stops at a step's
    end; a second Ctrl-C raises at once. Only the main thread takes signals (and only when ``enabled``)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pressed = False

    def _handle(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        console.print("stopping at the end of this step (Ctrl-C again to stop at once)")

    def __enter__(self):
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


class _Bar:
    """A step progress bar showing the running loss (rich), or nothing."""

    def __init__(self, total: int, done: int, *, enabled: bool):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("training", total=self.total, completed=self.done, loss="-")
        return self

    def advance(self, loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
