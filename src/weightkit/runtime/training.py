"""The training loop the verbs share (``weightkit adapt`` now, ``train`` next): batches, AdamW with a linear
warm-up, gradient clipping, NaN/Inf checks, evaluation, checkpoints and DistributedDataParallel.

What is trained and how it is saved belong to the verb: :func:`train_loop` takes the parameters to update
and a ``save_checkpoint`` function, and returns; the verb saves its result.

- Examples are texts, with a class label each (classification) or none (causal language modelling, the
  labels are the input ids). Each epoch reshuffles them (from ``seed``) and tokenizes them into batches.
- AdamW (no weight decay), the learning rate rising linearly over ``warmup_steps`` then constant, gradients
  clipped to norm 1.0. An evaluation on the held-out examples after every epoch and at the end.
- A checkpoint every ``save_every`` steps (``<checkpoints>/checkpoint-<step>``).
- A loss or gradient that is NaN/Inf stops training before the bad step is applied: the state as it was
  (the last good one) is saved to ``<checkpoints>/last-good`` and the error names the step.
- The model trains where it is (move it to its device first). Under ``torchrun --nproc-per-node N`` each
  process takes every N-th batch, DistributedDataParallel averages the gradients, and every process
  stops on a NaN/Inf that any of them meets (the losses are shared before anyone steps back from the
  collectives); only process 0 writes checkpoints and shows progress.
"""

import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from weightkit.data import load_texts, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.progress import console
from weightkit.runtime.distributed import barrier, gather_scalars, init_distributed

__all__ = [
    "TrainConfig",
    "Schedule",
    "load_examples",
    "split_examples",
    "make_batches",
    "forward_batch",
    "evaluate",
    "first_step_lr",
    "train_loop",
]


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


def train_loop(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    labels: list[int] | None,
    config: TrainConfig,
    *,
    params: list[nn.Parameter],
    save_checkpoint: Callable[[Path], None],
    checkpoints: Path,
    eval_texts: list[str] = (),
    eval_labels: list[int] | None = None,
    schedule: Schedule | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``params`` of ``model`` on the examples, where the model is.

    Args:
        model: the model (its parameters' device is where training runs).
        tokenizer: its tokenizer.
        texts, labels: training examples; ``labels`` (class ids) for classification, ``None`` for causal LM.
        config: steps, learning rate, batch size ...
        params: what the optimizer updates (requiring grad).
        save_checkpoint: writes the trained state to a new directory (replacing one that exists); called on
            process 0 only, for ``<checkpoints>/checkpoint-<step>`` and ``<checkpoints>/last-good``.
        checkpoints: the directory checkpoints go to.
        eval_texts, eval_labels: held-out examples, evaluated after every epoch and at the end.
        schedule: a method's training-time part (IncreLoRA's controller): its ``regularization()`` is added
            to the loss and its ``step()`` runs after every optimizer step. Under DDP it may leave some
            parameters out of a step (unused parameters are allowed then).
        progress: show a progress bar (process 0).

    Returns:
        ``{"steps", "train_loss" (mean of the last 10 steps over all processes), "eval": {...} (the final
        evaluation), "history": [...] (each evaluation with its step)}``.

    Raises:
        WeightkitError: no training examples, or a NaN/Inf loss or gradient on any process (after the last
            good state is saved), on every process.
    """
    if not texts:
        raise WeightkitError("no training examples")
    if not params:
        raise WeightkitError("nothing to train: no trainable parameters")
    device = next(model.parameters()).device
    rank, world = init_distributed(device)
    classification = labels is not None
    kwargs = {"batch_size": config.batch_size, "max_length": config.max_length}
    eval_batches = make_batches(tokenizer, list(eval_texts), eval_labels, **kwargs) if eval_texts else []
    order_rng = random.Random(config.seed)
    n_batches = math.ceil(len(texts) / config.batch_size)
    steps = config.max_steps
    total_steps = steps if steps is not None else config.epochs * math.ceil(n_batches / world)

    def batches_for_epoch() -> list[dict]:
        order = list(range(len(texts)))
        order_rng.shuffle(order)
        shuffled = [texts[i] for i in order]
        shuffled_labels = [labels[i] for i in order] if labels is not None else None
        return make_batches(tokenizer, shuffled, shuffled_labels, **kwargs)[rank::world]

    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=schedule is not None,
        )
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = config.warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_factor(s, warmup))

    def stop(what: str, step: int) -> WeightkitError:
        # Every process gets here together: process 0 saves the untouched state, the others wait for it
        # (torchrun stops all processes as soon as one exits with an error).
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            save_checkpoint(checkpoints / "last-good")
        barrier()
        return WeightkitError(
            f"{what} at step {step}; training stopped before that step. The last good state is in "
            f"{checkpoints / 'last-good'} (try a lower --lr)"
        )

    model.train()
    step, losses, history, epoch_batches = 0, [], [], []
    with _Bar(total_steps, enabled=progress and rank == 0) as bar:
        while step < total_steps:
            if not epoch_batches:
                epoch_batches = batches_for_epoch()
                if step and eval_batches and steps is None:
                    history.append(
                        {"step": step, **evaluate(model, eval_batches, classification=classification)}
                    )
            batch = epoch_batches.pop(0)
            loss = forward_batch(trained, batch).loss
            if schedule is not None:
                loss = loss + schedule.regularization()
            # Shared before backward(): a process that stopped alone would leave the others waiting in
            # DDP's gradient all-reduce.
            step_losses = gather_scalars(loss)
            bad = [(r, value) for r, value in enumerate(step_losses) if not math.isfinite(value)]
            if bad:
                where = [f"{value} on process {r}" if world > 1 else str(value) for r, value in bad]
                raise stop(f"the loss is {', '.join(where)}", step + 1)
            loss.backward()
            # DDP's gradients are averaged over the processes, so every process sees the same norm.
            grad_norm = nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(grad_norm):
                raise stop("the gradient is not finite", step + 1)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(sum(step_losses) / world)
            bar.advance(losses[-1])
            if schedule is not None:
                schedule.step()
            if config.save_every and step % config.save_every == 0 and step < total_steps and rank == 0:
                save_checkpoint(checkpoints / f"checkpoint-{step}")
    final = evaluate(model, eval_batches, classification=classification) if eval_batches else {}
    history.append({"step": step, **final})
    return {
        "steps": step,
        "train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "eval": final,
        "history": history,
    }


class _Bar:
    """A step progress bar showing the running loss (rich), or nothing."""

    def __init__(self, total: int, *, enabled: bool):
        self.enabled, self.total = enabled, total

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
            self.task = self.progress.add_task("training", total=self.total, loss="-")
        return self

    def advance(self, loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
