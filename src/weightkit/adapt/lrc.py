"""Fine-tuning WeLore's low-rank components: ``weightkit adapt WELORE_OUT -o OUT --method lrc``.

Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients"
(arXiv 2407.11239), "LRC fine-tuning": after ``weightkit compress --method welore``, only the low-rank
components' factors are trained (both ``weight_up`` and ``weight_down`` of every
:class:`~weightkit.quantized.lowrank.LowRankLinear`, as the reference's ``LowRankLayer`` trains both of its
linears); the N-LRCs, embeddings, norms and head stay frozen (the reference sets ``requires_grad=False`` on
the N-LRCs). Nothing is added to the model, so the result is not a PEFT adapter but the compressed
checkpoint itself with trained factors, in the same weightkit "lowrank" format, which :func:`weightkit.load`
reads (and ``weightkit export --dense`` expands).

The training loop is the one every ``adapt`` method uses (:func:`weightkit.runtime.training.train_loop`:
AdamW, warm-up, clipping, NaN/Inf checks, evaluation, checkpoints, ``resume``, torchrun). Causal LMs only:
the reference fine-tunes on next-token loss, and an encoder would need a new classification head that the
compressed checkpoint has no place for.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from weightkit.arch import model_task
from weightkit.checkpoint import CheckpointWriter, ModelCard, Provenance
from weightkit.checkpoint.manifest import data_files
from weightkit.checkpoint.writer import check_target
from weightkit.errors import WeightkitError
from weightkit.quantized.formats import export_tensors, quantized_model_config
from weightkit.quantized.lowrank import LowRankLinear
from weightkit.runtime.device import resolve_device
from weightkit.runtime.distributed import barrier, is_main_process
from weightkit.runtime.training import (
    TrainConfig,
    checkpoints_dir,
    latest_checkpoint,
    prepare_training,
    train_loop,
)

__all__ = ["finetune_lrc"]

_VERB = "weightkit adapt --method lrc"


def _require_lowrank_causal_lm(model_dir: Path) -> None:
    """Refuse, before loading anything, a directory that is not a causal LM in weightkit's lowrank format."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise WeightkitError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
    config = json.loads(config_file.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "weightkit" or qc.get("format") != "lowrank":
        raise WeightkitError(
            f"{model_dir} has no low-rank components: {_VERB} fine-tunes the factor pairs of a "
            "`weightkit compress --method welore` (or svd) output; compress the model first"
        )
    if model_task(config) != "causal-lm":
        raise WeightkitError(
            f"{model_dir} is not a causal LM: {_VERB} trains the factors on next-token loss, as WeLore does"
        )


def finetune_lrc(
    model_dir: str | Path,
    out_dir: str | Path,
    train: TrainConfig,
    *,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the low-rank factors of the WeLore checkpoint ``model_dir`` on ``data`` (everything else
    frozen) and save the checkpoint with the trained factors to ``out_dir`` (module docstring).

    Args:
        model_dir: a ``weightkit compress --method welore`` (or svd) output of a causal LM.
        out_dir: the checkpoint to write (weightkit's "lowrank" format); training checkpoints go to
            ``<out_dir>-checkpoints/``.
        train: steps, learning rate, batch size ...
        data, eval_data: text files (default: docstrings of Python's standard library).
        device: where to train (default: the GPU when there is one).
        overwrite: replace an existing ``out_dir``.
        resume: continue from the newest checkpoint in ``<out_dir>-checkpoints/``.
        progress: show a progress bar.

    Returns:
        :func:`~weightkit.runtime.training.train_loop`'s summary plus ``"trainable_parameters"``,
        ``"total_parameters"``, ``"lrc_layers"`` and ``"output"``.

    Raises:
        WeightkitError: ``model_dir`` is not a causal LM in weightkit's lowrank format; ``out_dir`` exists
            and not ``overwrite``; the training loop's refusals (NaN/Inf, resume mismatches ...).
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir)
    check_target(out_dir, overwrite=overwrite)  # before training, not when saving after it
    _require_lowrank_causal_lm(model_dir)
    checkpoints = checkpoints_dir(out_dir)
    if resume:
        latest_checkpoint(checkpoints)  # before the model is loaded
    setup = prepare_training(
        model_dir, train, verb=_VERB, device=resolve_device(device), data=data, eval_data=eval_data
    )
    model = setup.model
    lrcs = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for param in model.parameters():
        param.requires_grad_(False)
    params = [p for layer in lrcs.values() for p in (layer.weight_up, layer.weight_down)]
    for param in params:
        param.requires_grad_(True)

    run_config = {
        "train": dataclasses.asdict(train),
        "data": str(data) if data is not None else None,
        "eval_data": str(eval_data) if eval_data is not None else None,
    }
    provenance = Provenance("adapt", "lrc", run_config, (model_dir, *data_files(data, eval_data)))

    def save(where: Path, json_files=None, tensor_files=None, *, replace: bool = True) -> None:
        with CheckpointWriter(where, overwrite=replace, provenance=provenance) as writer:
            writer.copy_files(model_dir)
            writer.write_model_card(ModelCard("adapt", "lrc", [str(model_dir)]))
            for name, tensor in export_tensors(model):
                writer.add(name, tensor)
            writer.write_json("config.json", quantized_model_config(model))
            for file_name, value in (json_files or {}).items():
                writer.write_json(file_name, value)
            for file_name, file_tensors in (tensor_files or {}).items():
                contiguous = {key: t.detach().cpu().contiguous() for key, t in file_tensors.items()}
                save_file(contiguous, writer.path / file_name)

    settings = {"method": "lrc", "model": str(model_dir)}  # compared on resume
    summary = train_loop(
        model, setup.tokenizer, setup.texts, None, train, params=params, save_checkpoint=save,
        checkpoints=checkpoints, eval_texts=setup.eval_texts, settings=settings, resume=resume,
        progress=progress,
    )  # fmt: skip
    if is_main_process():
        save(out_dir, replace=overwrite)
    barrier()
    return {
        **summary,
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "lrc_layers": len(lrcs),
        "output": str(out_dir),
    }
