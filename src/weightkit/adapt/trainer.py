"""Training an adapter: what ``weightkit adapt MODEL --data FILE -o OUT`` runs.

The loop itself (batches, AdamW and warm-up, clipping, NaN/Inf checks, evaluation, checkpoints, DDP) is
:func:`weightkit.runtime.training.train_loop`; this module adds what is particular to adapters. Decoder
models train on the causal-LM loss of the texts; encoders (BERT-style) train a classification head on
``label`` fields (the head is trained with the adapter and saved with it, as PEFT's ``modules_to_save``).
The adapter is saved every ``save_every`` steps (to ``OUT-checkpoints/checkpoint-<step>``, beside ``OUT``)
and at the end (to ``OUT``), by process 0 only; a NaN/Inf saves the last good adapter to
``OUT-checkpoints/last-good`` and stops every process; Ctrl-C saves it to ``OUT-checkpoints/interrupted``.
``resume=True`` continues from the newest checkpoint, to the very adapter the run would have given.

Several processes (``torchrun --nproc-per-node N``) train one adapter with DistributedDataParallel, each on
its own device (``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU).
"""

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightkit.adapt.increlora import IncreLoRAConfig, IncreLoRAController
from weightkit.adapt.layer import adapt, adapter_configs, trainable_parameters
from weightkit.adapt.lora_sb import LoRASBConfig
from weightkit.adapt.peft_format import LABELS_FILE, save_adapter
from weightkit.checkpoint.manifest import Provenance, data_files
from weightkit.checkpoint.writer import check_target
from weightkit.errors import WeightkitError
from weightkit.registry import config_to_dict, entry_for_config
from weightkit.runtime.device import resolve_device
from weightkit.runtime.distributed import barrier, is_main_process
from weightkit.runtime.training import (
    Schedule,
    TrainConfig,
    checkpoints_dir,
    first_step_lr,
    latest_checkpoint,
    make_batches,
    prepare_training,
    split_examples,
    train_loop,
)

__all__ = ["train_adapter", "finetune"]


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
    schedule: Schedule | None = None,
    extra_json: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    provenance: Provenance | None = None,
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
        extra_json: more files for the adapter directory (and every checkpoint), ``{file name: JSON value}``,
            written with the adapter before it is published (a classifier's ``labels.json``).
        settings: more of what the result depends on (the base model ...), compared on ``resume`` with the
            checkpoint's, as the adapter's method and options and the training settings are.
        resume: continue from the newest checkpoint in ``<out_dir>-checkpoints/`` (``checkpoint-<step>`` or
            ``interrupted``).
        device: where to train; ``None`` trains where the model is. Under torchrun, this process's device.
        overwrite: replace an existing ``out_dir``.
        provenance: what the adapter directory's (and every checkpoint's) integrity manifest records
            (None: no manifest).

    Returns:
        ``{"steps", "train_loss", "eval": {...}, "history", "trainable_parameters", "total_parameters",
        "output"}``.
    """
    if device is not None:
        model.to(resolve_device(device))
    out_dir = Path(out_dir)
    if eval_texts is None:
        fraction, seed = config.eval_fraction, config.seed
        texts, labels, eval_texts, eval_labels = split_examples(texts, labels, fraction, seed)
    for module_name in head:
        for param in model.get_submodule(module_name).parameters():
            param.requires_grad = True
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise WeightkitError("nothing to train: the model has no trainable adapter parameters")
    n_trainable, n_total = trainable_parameters(model)

    def save(where: Path, json_files=None, tensor_files=None, *, replace: bool = True) -> None:
        save_adapter(
            model,
            where,
            name=name,
            modules_to_save=list(head),
            extra_json={**(extra_json or {}), **(json_files or {})},
            extra_tensors=tensor_files,
            overwrite=replace,
            provenance=provenance,
        )

    adapter_config = adapter_configs(model).get(name)
    if adapter_config is None:
        raise WeightkitError(f"the model has no adapter named {name!r}")
    settings = {
        "method": entry_for_config(adapter_config).name,
        **{f"adapter.{k}": v for k, v in dataclasses.asdict(adapter_config).items()},
        "head": list(head),
        **(settings or {}),
    }
    summary = train_loop(
        model, tokenizer, texts, labels, config, params=params, save_checkpoint=save,
        checkpoints=checkpoints_dir(out_dir), eval_texts=eval_texts, eval_labels=eval_labels,
        schedule=schedule, settings=settings, resume=resume, progress=progress,
    )  # fmt: skip
    if is_main_process():
        save(out_dir, replace=overwrite)
    barrier()
    return {
        **summary,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "output": str(out_dir),
    }


def finetune(
    model_dir: str | Path,
    adapter_config,
    out_dir: str | Path,
    train: TrainConfig,
    *,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    device: str | torch.device | None = None,
    autocast_adapter_dtype: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Load a Hugging Face model directory, add the adapter ``adapter_config`` describes, train it on ``data``
    and save it to ``out_dir`` in PEFT's format: the whole of ``weightkit adapt``.

    Causal LMs (any transformers knows, GPT-2's ``Conv1D`` layers too) train on the causal-LM loss of the
    texts (default: docstrings of Python's standard library).
    Encoders need a ``.jsonl``/``.json`` file whose records have ``text`` and ``label``: a classification head
    (``AutoModelForSequenceClassification``, class ids in sorted label order, the names in the model's
    ``config.id2label``) is trained with the adapter and saved with it, as PEFT saves a ``SEQ_CLS`` adapter
    (``task_type: SEQ_CLS``, the head in ``modules_to_save``, ``base_model_name_or_path`` the model
    directory's absolute path); the label names go to ``out_dir/labels.json``. ``weightkit.load(model_dir,
    adapter=out_dir)`` gives the trained classifier with its label names. PEFT's
    ``AutoPeftModelForSequenceClassification.from_pretrained(out_dir)`` builds the base from
    ``base_model_name_or_path`` alone, with the base config's labels (two by default): nothing in the adapter
    directory can give it the number of labels (peft 0.21, transformers 5; a ``config.json`` there would make
    transformers take the directory for a complete model), so pass the labels, both ways (transformers 5
    keeps the default ``label2id`` when given ``id2label`` alone): with ``names = json.load(open(out_dir /
    "labels.json"))``, ``from_pretrained(out_dir, id2label=dict(enumerate(names)), label2id={n: i for i, n
    in enumerate(names)})``.

    The model moves to ``device`` (default: the GPU when there is one, ``cuda:LOCAL_RANK`` under torchrun)
    before the adapter is added, so data-driven initialisations (EVA, LoRA-SB, the SVDs of PiSSA, LoRA-XS
    and SVFit) run there too. Without ``eval_data`` the held-out examples are split off first, so those
    initialisations see training examples only. LoRA-SB without an ``init_lr`` takes the run's first-step
    learning rate (``train.lr`` after warm-up scaling), as its authors do. ``autocast_adapter_dtype``: float32
    adapters on a 16-bit model (PEFT's default; see :func:`weightkit.adapt.adapt`). ``allow_pickle``: also
    read a ``.bin``/``.pt`` pickle checkpoint (unpickling can run code: trusted files only).

    ``resume``: continue from the newest checkpoint in ``<out_dir>-checkpoints/`` (``checkpoint-<step>``, or
    ``interrupted`` after Ctrl-C); the result is bit for bit the one an uninterrupted run gives. Every setting
    (the method and its options, the training settings, the data, the model) must be the checkpoint's: a
    difference is refused by name. IncreLoRA, whose rank schedule is not saved, cannot resume.
    """
    # Absolute: the saved adapter's base_model_name_or_path, which PEFT's AutoPeftModel loads from any cwd.
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir)
    check_target(out_dir, overwrite=overwrite)  # before training, not when saving after it
    if resume:
        latest_checkpoint(checkpoints_dir(out_dir))  # before the model is loaded
    setup = prepare_training(
        model_dir, train, verb="weightkit adapt", device=resolve_device(device), data=data,
        eval_data=eval_data, allow_pickle=allow_pickle,
    )  # fmt: skip
    model, tokenizer, texts, labels = setup.model, setup.tokenizer, setup.texts, setup.labels
    lora_sb = isinstance(adapter_config, LoRASBConfig) and adapter_config.init == "gradient"
    if lora_sb and adapter_config.init_lr is None:
        adapter_config = dataclasses.replace(adapter_config, init_lr=first_step_lr(train))
    init_data = make_batches(
        tokenizer, texts[: 8 * train.batch_size], labels[: 8 * train.batch_size] if labels else None,
        batch_size=train.batch_size, max_length=train.max_length,
    )  # fmt: skip
    adapt(model, adapter_config, data=init_data, autocast_adapter_dtype=autocast_adapter_dtype)
    schedule = IncreLoRAController(model) if isinstance(adapter_config, IncreLoRAConfig) else None
    # A classifier's label names go beside the adapter (weightkit.load gives them back).
    extra_json = {LABELS_FILE: setup.label_names} if setup.label_names is not None else None
    method = config_to_dict(adapter_config)
    run_config = {
        "adapter": method,  # as run: LoRA-SB's init_lr filled in
        "train": dataclasses.asdict(train),
        "data": str(data) if data is not None else None,
        "eval_data": str(eval_data) if eval_data is not None else None,
        "autocast_adapter_dtype": autocast_adapter_dtype,
    }
    provenance = Provenance("adapt", method["method"], run_config, (model_dir, *data_files(data, eval_data)))
    summary = train_adapter(
        model, tokenizer, texts, labels, out_dir, train, eval_texts=setup.eval_texts,
        eval_labels=setup.eval_labels, head=setup.head, schedule=schedule, extra_json=extra_json,
        settings={"model": str(model_dir), "autocast_adapter_dtype": autocast_adapter_dtype}, resume=resume,
        overwrite=overwrite, progress=progress, provenance=provenance,
    )  # fmt: skip
    return {"model": str(model_dir), "kind": setup.task, **summary}
