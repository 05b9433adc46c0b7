"""Chained compression: pruning stages, then at most one quantization stage (2:4 SparseGPT + GPTQ W4, as
llm-compressor users do), from a checkpoint directory to a new one.

Each stage is an ordinary :func:`~weightkit.compress.compress_checkpoint` run, streamed, into a temporary
directory beside the output (quantizing a pruned checkpoint records its ``sparsity.json`` as
compressed-tensors' ``sparsity_config``: :func:`pruned_source`); the last stage's result is then copied
into the output one tensor at a time by one atomic writer, with a model card naming every stage. The
temporary directory is removed in every case, so a failure leaves nothing at the output.

The quantization stage keeps the pruned zeros: GPTQ runs with ``keep_zeros`` (no error is moved onto a
zero), RTN and AWQ keep them by construction (a zero rounds to the grid's zero; AWQ's scales multiply it).
Other methods are refused after a pruning stage: VPTQ's codebooks and FlexRound's learned rounding, FP8/FP4,
ternary and GWQ have not been checked to keep every zero.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from weightkit.checkpoint import CheckpointReader, CheckpointWriter, ModelCard, Provenance
from weightkit.checkpoint.manifest import data_files
from weightkit.checkpoint.writer import check_target
from weightkit.compress.prune.core import SPARSITY_FILE, PruneFields
from weightkit.compress.quant.calibrated import AWQConfig, GPTQConfig
from weightkit.compress.quant.rtn import RTNConfig
from weightkit.errors import WeightkitError
from weightkit.quantized.compressed_tensors import sparsity_config
from weightkit.registry import config_to_dict

__all__ = ["check_stages", "compress_stages", "stages_as_run", "keeps_zeros", "pruned_source", "sparsity_of"]

# Quantization methods that may follow a pruning stage: each keeps exact zeros (tested).
_KEEP_ZEROS = (RTNConfig, GPTQConfig, AWQConfig)


def _method(config) -> str:
    return config_to_dict(config)["method"]


def check_stages(configs: list) -> None:
    """Refuse a list of stages that is not pruning stages followed by at most one quantization stage (one
    that keeps zeros), before anything runs.

    Raises:
        WeightkitError: no stage, a quantization stage before a pruning stage, two quantization stages, or a
            quantization method that is not known to keep the pruned zeros (named).
    """
    if not configs:
        raise WeightkitError("stages: the list of stages is empty")
    methods = [_method(c) for c in configs]
    quantizing = [i for i, c in enumerate(configs) if not isinstance(c, PruneFields)]
    if len(quantizing) > 1:
        raise WeightkitError(
            f"stages: {' and '.join(methods[i] for i in quantizing)} are two quantization stages; a recipe "
            "quantizes once, in its last stage"
        )
    if quantizing and quantizing[0] != len(configs) - 1:
        later = methods[quantizing[0] + 1]
        raise WeightkitError(
            f"stages: quantization stage {methods[quantizing[0]]} comes before pruning stage {later}; prune "
            "first, then quantize (the quantized grid cannot be pruned)"
        )
    if quantizing and len(configs) > 1 and not isinstance(configs[-1], _KEEP_ZEROS):
        allowed = ", ".join(_method(cls()) for cls in _KEEP_ZEROS)
        raise WeightkitError(
            f"stages: {methods[-1]} after pruning is not supported: it is not known to keep the pruned "
            f"weights exactly zero; use {allowed}"
        )


def keeps_zeros(config) -> bool:
    """Whether quantizing with ``config`` keeps every exact zero of the weights."""
    return isinstance(config, RTNConfig | AWQConfig) or (isinstance(config, GPTQConfig) and config.keep_zeros)


def pruned_source(model_dir: str | os.PathLike, config) -> dict | None:
    """The ``sparsity.json`` record of ``model_dir`` when it is a pruned checkpoint that ``config`` (a
    quantization config) keeps pruned, else ``None``.

    Raises:
        WeightkitError: ``model_dir`` is pruned and ``config`` would not keep its zeros (the record would be
            wrong, and the sparsity lost without a word).
    """
    path = Path(model_dir) / SPARSITY_FILE
    if not path.is_file():
        return None
    if not keeps_zeros(config):
        raise WeightkitError(
            f"{model_dir} is a pruned model ({SPARSITY_FILE}) and {_method(config)} would not keep its "
            "zeros: "
            "quantize it with rtn, awq or gptq with keep_zeros: true (as a recipe's stages do), or delete "
            f"{SPARSITY_FILE} to quantize it as a dense model"
        )
    return json.loads(path.read_text())


def sparsity_of(record: dict) -> dict:
    """compressed-tensors' ``sparsity_config`` for a ``sparsity.json`` record."""
    return sparsity_config(record["structure"], record["global_sparsity"], list(record["layers"]))


def stages_as_run(configs: list) -> list:
    """``configs`` checked (:func:`check_stages`) and as they run: a GPTQ stage after pruning gets
    ``keep_zeros`` (RTN and AWQ keep zeros anyway)."""
    check_stages(configs)
    if len(configs) > 1 and isinstance(configs[-1], GPTQConfig):
        return [*configs[:-1], dataclasses.replace(configs[-1], keep_zeros=True)]
    return list(configs)


def compress_stages(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    configs: list,
    data=None,
    *,
    run: Callable[..., Path],
    progress: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Run ``configs`` in turn on the model in ``model_dir`` and write the result to ``out_dir`` (see the
    module docstring), each stage by ``run`` (:func:`~weightkit.compress.compress_checkpoint`, passed in by
    it); the other arguments are its own."""
    configs = stages_as_run(configs)
    check_target(out_dir, overwrite=overwrite)
    target = Path(os.path.abspath(out_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.stages-", dir=target.parent))
    try:
        source = Path(model_dir)
        for i, config in enumerate(configs):
            stage_out = work / f"stage{i}"
            run(
                source,
                stage_out,
                config,
                data,
                progress=progress,
                max_shard_bytes=max_shard_bytes,
                allow_pickle=allow_pickle and i == 0,
                device=device,
            )
            source = stage_out
        stages = [config_to_dict(c) for c in configs]
        method = " + ".join(c["method"] for c in stages)
        card = ModelCard("compress", method, [str(model_dir)], {"stages": stages})
        provenance = Provenance("compress", method, {"stages": stages}, (model_dir, *data_files(data)))
        with (
            CheckpointReader(source) as reader,
            CheckpointWriter(
                out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite, provenance=provenance
            ) as writer,
        ):
            writer.copy_files(source)
            writer.write_model_card(card)
            for name in reader.names():
                writer.add(name, reader.get(name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
