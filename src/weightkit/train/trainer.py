"""Full-parameter training of a Hugging Face model: what ``weightkit train MODEL --data FILE -o OUT`` runs.

Every weight is trained, with one of the optimizers of :data:`OPTIMIZERS` (built by
:func:`build_optimizer`), in the loop ``weightkit adapt`` uses too
(:func:`weightkit.runtime.training.train_loop`: warm-up, clipping, NaN/Inf checks, held-out evaluation,
checkpoints, resume, Ctrl-C, DDP). Decoders train on the causal-LM loss of the texts; encoders train as
classifiers with a new head on ``label`` fields (:func:`weightkit.runtime.training.prepare_training`).

The weights are loaded and trained in float32 (an optimizer step on bfloat16 weights loses most small
updates) and saved in float32. The output, and every checkpoint (``OUT-checkpoints/checkpoint-<step>``,
``last-good``, ``interrupted``), is an ordinary Hugging Face directory written by ``save_pretrained``
(transformers' own tensor names), with the tokenizer and a model card; a checkpoint also holds the loop's
state (the optimizer's, the data order's ...), so ``resume`` loads the model from it and continues bit
for bit.

Under ``torchrun --nproc-per-node N``: ``zo-dist`` exchanges one projected gradient per process and step
(:class:`~weightkit.train.zeroth_order.DistributedZerothOrderSGD`); the gradient optimizers but
``galore-layerwise`` run under DistributedDataParallel; ``zo`` and ``galore-layerwise`` are refused. Every
run ends with the processes comparing their weights (the log says they are identical).
"""

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from weightkit.checkpoint import CheckpointWriter, ModelCard, Provenance
from weightkit.checkpoint.manifest import data_files
from weightkit.checkpoint.writer import check_target
from weightkit.errors import WeightkitError
from weightkit.progress import console
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.runtime.device import resolve_device
from weightkit.runtime.distributed import barrier, is_main_process, launched_processes
from weightkit.runtime.training import (
    TrainConfig,
    checkpoints_dir,
    latest_checkpoint,
    prepare_training,
    train_loop,
)
from weightkit.train.adamp import AdamP
from weightkit.train.galore import GaLoreAdamW, galore_param_groups
from weightkit.train.zeroth_order import DistributedZerothOrderSGD, ZerothOrderSGD

__all__ = ["OPTIMIZERS", "default_lr", "build_optimizer", "optimizer_state_bytes", "train_model"]

OPTIMIZERS = {
    "adamw": "AdamW (torch's), two moments per weight: the baseline",
    "adamp": "AdamP: Adam without the norm growth of scale-invariant weights",
    "galore": "GaLore: AdamW whose moments live in a rank-r projection of each block matrix's gradient",
    "galore-layerwise": "GaLore updating each weight in its gradient hook: no full gradient is held",
    "qgalore": "Q-GaLore: GaLore with 4-bit projections, refreshed less often once they stop moving",
    "svdfree": "SVD-free GaLore: the DCT basis vectors that carry the gradient instead of an SVD",
    "zo": "MeZO: zeroth-order SGD, two forward passes per step and the memory of inference",
    "zo-dist": "MeZO over torchrun processes that exchange one number per process and step",
}
# The group keys each GaLore variant adds (Q-GaLore's: its paper's 4-bit projections, cosine threshold
# 0.4 over a queue of 5), and whether it updates in the gradient hooks.
_GALORE = {
    "galore": ({}, False),
    "galore-layerwise": ({}, True),
    "qgalore": ({"proj_bits": 4, "cos_threshold": 0.4, "queue_size": 5}, False),
    "svdfree": ({"basis": "dct"}, False),
}
# MeZO's perturbation scale (the paper's).
ZO_EPS = 1e-3


def default_lr(optimizer: str) -> float:
    """The learning rate ``weightkit train`` uses without ``--lr``: 1e-6 for zeroth-order SGD (MeZO's
    range for fine-tuning), 1e-5 for the others (full fine-tuning with Adam)."""
    return 1e-6 if optimizer in ("zo", "zo-dist") else 1e-5


def build_optimizer(
    name: str, model: nn.Module, *, lr: float, rank: int = 128, update_proj_gap: int = 200, seed: int = 0
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (:data:`OPTIMIZERS`) over every trainable parameter of ``model``.

    GaLore's variants project the matrices of the linear layers in the model's repeated blocks at
    ``rank``, refreshed every ``update_proj_gap`` steps (scale 0.25, the paper's), and train every other
    parameter with AdamW (:func:`~weightkit.train.galore.galore_param_groups`). Zeroth-order SGD
    perturbs by 1e-3 (the paper's) with directions drawn from ``seed``. No weight decay.

    Raises:
        WeightkitError: an unknown name; a ``rank`` larger than a projected matrix; ``zo-dist`` outside
            torchrun.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamp":
        return AdamP(params, lr=lr)
    if name in _GALORE:
        keys, per_layer = _GALORE[name]
        groups = galore_param_groups(model, rank, update_proj_gap=update_proj_gap, scale=0.25, **keys)
        return GaLoreAdamW(groups, lr=lr, per_layer=per_layer)
    if name == "zo":
        return ZerothOrderSGD(params, lr=lr, eps=ZO_EPS, seed=seed)
    if name == "zo-dist":
        return DistributedZerothOrderSGD(params, lr=lr, eps=ZO_EPS, seed=seed)
    raise WeightkitError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of every tensor the optimizer keeps per parameter (moments, projections ...)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def _check_launch(optimizer: str) -> None:
    """Refuse an optimizer that cannot run the way this process was launched."""
    processes = launched_processes()
    if optimizer == "zo-dist" and processes < 2:
        raise WeightkitError(
            "--optimizer zo-dist exchanges projected gradients between processes: launch it with torchrun "
            "(torchrun --nproc-per-node 2 $(which weightkit) train ...); in one process use --optimizer zo"
        )
    if optimizer == "zo" and processes > 1:
        raise WeightkitError(
            "--optimizer zo under torchrun would let every process drift apart: use --optimizer zo-dist"
        )
    if optimizer == "galore-layerwise" and processes > 1:
        raise WeightkitError(
            "--optimizer galore-layerwise updates each weight during backward, before DDP averages the "
            "gradients: it cannot run under torchrun (use --optimizer galore)"
        )


def train_model(
    model_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    optimizer: str = "adamw",
    rank: int = 128,
    update_proj_gap: int = 200,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Train every weight of a Hugging Face model directory on ``data`` and save it to ``out_dir``: the whole
    of ``weightkit train``.

    Args:
        model_dir: the model (a causal LM, or a text encoder trained as a classifier).
        out_dir: the trained model's directory (checkpoints go to ``<out_dir>-checkpoints/``).
        config: steps, learning rate (``config.lr``), batch size ...
        optimizer: a name of :data:`OPTIMIZERS`.
        rank, update_proj_gap: GaLore's projection rank and refresh interval (its variants only).
        data, eval_data: example files (:func:`weightkit.runtime.training.prepare_training`).
        device: where to train (default: the GPU when there is one; ``cuda:LOCAL_RANK`` under torchrun).
        resume: continue from the newest checkpoint in ``<out_dir>-checkpoints/``, with the same settings.
        overwrite: replace an existing ``out_dir``.
        allow_pickle: also read ``.bin``/``.pt`` pickle checkpoints (trusted files only).

    Returns:
        The loop's summary (``steps``, ``train_loss``, ``eval``, ``history``, under torchrun ``replicas``)
        with ``model``, ``task``, ``optimizer``, ``parameters``, ``optimizer_state_bytes`` and ``output``;
        for ``zo-dist``, ``bytes_exchanged_per_step`` (received by one process) and ``ddp_gradient_bytes``
        (the gradient DDP would all-reduce instead).

    Raises:
        WeightkitError: an unknown optimizer or one that does not fit the launch, a quantized model, bad
            data, a rank larger than a matrix, an existing ``out_dir`` without ``overwrite``, ``resume``
            without a checkpoint or with other settings, a NaN/Inf loss (after saving the last good state).
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir)
    if optimizer not in OPTIMIZERS:
        raise WeightkitError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    _check_launch(optimizer)
    check_target(out_dir, overwrite=overwrite)  # before training, not when saving after it
    refuse_quantized(
        model_dir, verb="weightkit train", instead="train the full-precision model, then compress it"
    )
    checkpoints = checkpoints_dir(out_dir)
    setup = prepare_training(
        model_dir, config, verb="weightkit train", device=resolve_device(device), data=data,
        eval_data=eval_data, dtype=torch.float32, allow_pickle=allow_pickle,
        weights_from=latest_checkpoint(checkpoints) if resume else None,
    )  # fmt: skip
    model = setup.model.requires_grad_(True)
    built = build_optimizer(
        optimizer, model, lr=config.lr, rank=rank, update_proj_gap=update_proj_gap, seed=config.seed
    )
    settings = {"optimizer": optimizer, "model": str(model_dir)}
    if optimizer in _GALORE:
        settings.update(rank=rank, update_proj_gap=update_proj_gap)
    card = ModelCard("train", optimizer, [str(model_dir)], {**settings, "lr": config.lr, "seed": config.seed})
    run_config = {
        "optimizer": optimizer,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "train": dataclasses.asdict(config),
        "data": str(data) if data is not None else None,
        "eval_data": str(eval_data) if eval_data is not None else None,
    }
    provenance = Provenance("train", optimizer, run_config, (model_dir, *data_files(data, eval_data)))

    def save(where: Path, json_files: dict, tensor_files: dict, *, replace: bool = True) -> None:
        with CheckpointWriter(where, overwrite=replace, provenance=provenance) as writer:
            model.save_pretrained(writer.path)
            setup.tokenizer.save_pretrained(writer.path)
            writer.write_model_card(card)
            for name, value in json_files.items():
                writer.write_json(name, value)
            for name, tensors in tensor_files.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, writer.path / name)

    params = [p for p in model.parameters() if p.requires_grad]
    gradient_bytes = sum(p.numel() * p.element_size() for p in params)
    if optimizer == "zo-dist" and is_main_process():
        console.print(
            f"zo-dist: {launched_processes()} processes exchange one projected gradient each per step "
            f"(8 bytes per process) instead of DDP's all-reduce of {gradient_bytes / 1e6:,.1f} MB of "
            "gradients",
            soft_wrap=True,
        )
    summary = train_loop(
        model, setup.tokenizer, setup.texts, setup.labels, config, params=params, save_checkpoint=save,
        checkpoints=checkpoints, optimizer=built, model_in_checkpoint=True, eval_texts=setup.eval_texts,
        eval_labels=setup.eval_labels, settings=settings, resume=resume, progress=progress,
    )  # fmt: skip
    if is_main_process():
        save(out_dir, {}, {}, replace=overwrite)
    barrier()
    result = {
        "model": str(model_dir),
        "task": setup.task,
        "optimizer": optimizer,
        **summary,
        "parameters": sum(p.numel() for p in params),
        "optimizer_state_bytes": optimizer_state_bytes(built),
        "output": str(out_dir),
    }
    if optimizer == "zo-dist":
        result.update(bytes_exchanged_per_step=built.bytes_exchanged, ddp_gradient_bytes=gradient_bytes)
    if "replicas" in summary and is_main_process():
        processes, digest = summary["replicas"]["processes"], summary["replicas"]["sha256"]
        received = ""
        if optimizer == "zo-dist":
            received = f"; each step every process received {built.bytes_exchanged} bytes"
        console.print(
            f"all {processes} processes hold identical weights (SHA-256 {digest[:16]}){received}",
            soft_wrap=True,
        )
    return result
