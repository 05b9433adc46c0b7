"""A small, standard training loop for adapters: what ``weightkit adapt MODEL --data FILE -o OUT`` runs.

Decoder models train on the causal-LM loss of the texts; encoders (BERT-style) train a classification head
on ``label`` fields (the head is trained with the adapter and saved with it, as PEFT's
``modules_to_save``). AdamW, linear warm-up then constant learning rate, gradient clipping at 1.0; an
evaluation on held-out examples (eval loss and perplexity, or accuracy) after every epoch and at the end;
the adapter saved every ``save_every`` steps (to ``OUT-checkpoints/checkpoint-<step>``, beside ``OUT``) and
at the end (to ``OUT``).

Several processes (``torchrun --nproc-per-node N``) train one adapter with DistributedDataParallel: each
process takes every N-th batch, gradients are averaged, process 0 saves and reports.

A loss or gradient that is NaN/Inf stops training before the bad step is applied: the adapter as it was
(the last good state) is saved to ``OUT-checkpoints/last-good`` and the error names the step.
"""

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightkit.adapt.layer import forward_batch, trainable_parameters
from weightkit.adapt.peft_format import save_adapter
from weightkit.data import load_texts, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.progress import console

__all__ = ["TrainConfig", "load_examples", "make_batches", "train_adapter"]


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


def make_batches(
    tokenizer, texts: list[str], labels: list[int] | None, *, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
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


def first_step_lr(config: "TrainConfig") -> float:
    """The learning rate of the first optimizer step: ``lr`` scaled by the warm-up."""
    return config.lr * _warmup_factor(0, config.warmup_steps)


def _warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: step ``s`` (from 0) runs at ``(s + 1) / (warmup_steps + 1)`` of ``lr``, then ``lr``."""
    return min(1.0, (step + 1) / (max(warmup_steps, 0) + 1))


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


def _distributed() -> tuple[int, int]:
    """``(rank, world size)``; starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def train_adapter(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    labels: list[int] | None,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    eval_texts: list[str] | None = None,
    eval_labels: list[int] | None = None,
    name: str = "default",
    head: list[str] = (),
    schedule=None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the adapter ``name`` already on ``model`` (plus the ``head`` modules) and save it to ``out_dir``.

    Args:
        model: a model adapted with :func:`weightkit.adapt.adapt`.
        tokenizer: its tokenizer.
        texts, labels: training examples; ``labels`` (class ids) for classification, ``None`` for causal LM.
        out_dir: the adapter directory written at the end (checkpoints go to ``<out_dir>-checkpoints/``).
        config: steps, learning rate, batch size ...
        eval_texts, eval_labels: held-out examples (default: ``config.eval_fraction`` of ``texts``).
        head: modules trained in full and saved with the adapter (a new classification head).
        schedule: a method's training-time part (IncreLoRA's :class:`IncreLoRAController`): its
            ``regularization()`` is added to the loss and its ``step()`` runs after every optimizer step.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``{"steps", "train_loss", "eval": {...}, "trainable_parameters", "output"}``.
    """
    rank, world = _distributed()
    out_dir = Path(out_dir)
    checkpoints = out_dir.with_name(out_dir.name + "-checkpoints")
    if eval_texts is None:
        texts, labels, eval_texts, eval_labels = split_examples(
            texts, labels, config.eval_fraction, config.seed
        )
    if not texts:
        raise WeightkitError("no training examples")
    classification = labels is not None
    for module_name in head:
        for param in model.get_submodule(module_name).parameters():
            param.requires_grad = True
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise WeightkitError("nothing to train: the model has no trainable adapter parameters")
    n_trainable, n_total = trainable_parameters(model)

    kwargs = {"batch_size": config.batch_size, "max_length": config.max_length}
    eval_batches = make_batches(tokenizer, eval_texts, eval_labels, **kwargs) if eval_texts else []
    order_rng = random.Random(config.seed)
    epoch_batches = []
    steps = config.max_steps
    n_batches = math.ceil(len(texts) / config.batch_size)
    total_steps = steps if steps is not None else config.epochs * math.ceil(n_batches / world)

    def batches_for_epoch() -> list[dict]:
        order = list(range(len(texts)))
        order_rng.shuffle(order)
        shuffled = [texts[i] for i in order]
        shuffled_labels = [labels[i] for i in order] if labels is not None else None
        return make_batches(tokenizer, shuffled, shuffled_labels, **kwargs)[rank::world]

    trained = model
    if world > 1:
        # A schedule may leave some adapter parameters out of a step (IncreLoRA's unused components).
        trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=schedule is not None)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_factor(s, config.warmup_steps)
    )
    model.train()
    step, losses, history = 0, [], []
    save_kwargs = {"name": name, "modules_to_save": list(head)}

    def save(where: Path, replace: bool) -> None:
        if rank == 0:
            save_adapter(model, where, overwrite=replace, **save_kwargs)

    bar = _Bar(total_steps, enabled=progress and rank == 0)
    with bar:
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
            if not torch.isfinite(loss):
                save(checkpoints / "last-good", True)
                raise WeightkitError(
                    f"the loss is {loss.item()} at step {step + 1}; training stopped before that step. "
                    f"The last good adapter is in {checkpoints / 'last-good'} (try a lower --lr)"
                )
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                save(checkpoints / "last-good", True)
                raise WeightkitError(
                    f"the gradient is not finite at step {step + 1}; training stopped before that step. "
                    f"The last good adapter is in {checkpoints / 'last-good'} (try a lower --lr)"
                )
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            bar.advance(losses[-1])
            if schedule is not None:
                schedule.step()
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                save(checkpoints / f"checkpoint-{step}", True)
    final = evaluate(model, eval_batches, classification=classification) if eval_batches else {}
    history.append({"step": step, **final})
    save(out_dir, overwrite)
    if world > 1:
        torch.distributed.barrier()
    return {
        "steps": step,
        "train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "eval": final,
        "history": history,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "output": str(out_dir),
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


def finetune(
    model_dir: str | Path,
    adapter_config,
    out_dir: str | Path,
    train: TrainConfig,
    *,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Load a Hugging Face model directory, add the adapter ``adapter_config`` describes, train it on ``data``
    and save it to ``out_dir`` in PEFT's format: the whole of ``weightkit adapt``.

    Decoders train on the causal-LM loss of the texts (default: docstrings of Python's standard library).
    Encoders need a ``.jsonl``/``.json`` file whose records have ``text`` and ``label``: a classification head
    (``AutoModelForSequenceClassification``) is trained with the adapter and saved with it; the label names
    go to ``out_dir/labels.json``.

    Without ``eval_data`` the held-out examples are split off first, so data-driven initialisations (EVA's
    activations, LoRA-SB's gradient) see training examples only. LoRA-SB without an ``init_lr`` takes the
    run's first-step learning rate (``train.lr`` after warm-up scaling), as its authors do.
    """
    from transformers import AutoModelForSequenceClassification

    from weightkit.adapt import adapt
    from weightkit.adapt.increlora import IncreLoRAConfig, IncreLoRAController
    from weightkit.adapt.lora_sb import LoRASBConfig
    from weightkit.data import stdlib_docstrings
    from weightkit.models import load_model, load_tokenizer, model_kind

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise WeightkitError(f"{out_dir} exists; pass --force to overwrite it")
    texts, labels = load_examples(data) if data is not None else (stdlib_docstrings("calib"), None)
    eval_texts, eval_labels = load_examples(eval_data) if eval_data is not None else (None, None)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise WeightkitError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    kind = model_kind(json.loads(config_file.read_text()))
    torch.manual_seed(train.seed)  # the classification head's and the adapter's initialisation
    head, label_names = [], None
    if kind == "causal-lm":
        if labels is not None:
            labels = eval_labels = None  # a decoder learns the texts; labels are not used
        model, tokenizer, _ = load_model(model_dir)
    else:
        if labels is None:
            raise WeightkitError(
                "an encoder is fine-tuned as a classifier: give --data a .jsonl/.json file whose records "
                "have 'text' and 'label'"
            )
        label_names = sorted({str(v) for v in labels + (eval_labels or [])})
        ids = {v: i for i, v in enumerate(label_names)}
        labels = [ids[str(v)] for v in labels]
        eval_labels = [ids[str(v)] for v in eval_labels] if eval_labels is not None else None
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(label_names), local_files_only=True
        )
        tokenizer = load_tokenizer(model_dir)
        head = ["classifier"]
    if tokenizer is None:
        raise WeightkitError(f"{model_dir} has no tokenizer files; training needs the model's tokenizer")
    if eval_texts is None:
        texts, labels, eval_texts, eval_labels = split_examples(
            texts, labels, train.eval_fraction, train.seed
        )
    lora_sb = isinstance(adapter_config, LoRASBConfig) and adapter_config.init == "gradient"
    if lora_sb and adapter_config.init_lr is None:
        adapter_config = dataclasses.replace(adapter_config, init_lr=first_step_lr(train))
    init_data = make_batches(
        tokenizer, texts[: 8 * train.batch_size], labels[: 8 * train.batch_size] if labels else None,
        batch_size=train.batch_size, max_length=train.max_length,
    )  # fmt: skip
    adapt(model, adapter_config, data=init_data)
    schedule = IncreLoRAController(model) if isinstance(adapter_config, IncreLoRAConfig) else None
    summary = train_adapter(
        model, tokenizer, texts, labels, out_dir, train,
        eval_texts=eval_texts, eval_labels=eval_labels, head=head, schedule=schedule,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip
    if label_names is not None and (out_dir / "adapter_config.json").is_file():
        (out_dir / "labels.json").write_text(json.dumps(label_names))
    return {"model": str(model_dir), "kind": kind, **summary}
