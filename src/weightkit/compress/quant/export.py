"""Save a model with quantized layers as a HF directory: compressed-tensors ("pack-quantized" for integer
grids, "float-quantized" / "nvfp4-pack-quantized" for FP8 / FP4), or weightkit's own format for VPTQ and
GWQ layers ("vptq" / "gwq", which only :func:`weightkit.load` reads).

Which format stores which layer is :mod:`weightkit.quantized.formats`, the layouts
:mod:`weightkit.quantized.compressed_tensors` and :mod:`weightkit.quantized.weightkit_format`; this module
writes them through the one atomic writer.
"""

import os
from pathlib import Path

from torch import nn

from weightkit.checkpoint import CheckpointWriter, Provenance
from weightkit.quantized.formats import export_tensors, quantized_model_config

__all__ = ["save_quantized", "write_generation_config"]


def write_generation_config(writer, model: nn.Module, source_dir: str | os.PathLike | None) -> None:
    """Write ``generation_config.json`` from the model unless it was copied from ``source_dir``."""
    generation_config = getattr(model, "generation_config", None)
    copied = source_dir is not None and (Path(source_dir) / "generation_config.json").is_file()
    if generation_config is not None and not copied:
        writer.write_json("generation_config.json", generation_config.to_diff_dict())


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    provenance: Provenance | None = None,
) -> Path:
    """Write a model holding quantized layers as a quantized model directory.

    Non-quantized tensors of the state dict are written as they are; each quantized layer in its format's
    layout (module docstring): ``QuantizedLinear`` and ``FloatQuantizedLinear`` in compressed-tensors',
    ``VPTQLinear`` and ``OutlierQuantizedLinear`` in weightkit's (one format per checkpoint). Tensors that
    share storage (tied embeddings) are written once, under the first name, as ``save_pretrained`` does.
    Config, tokenizer and other non-weight files are copied from ``source_dir``; ``config.json`` is written
    from ``model.config`` (when the model has one) plus the ``quantization_config`` block. The write is
    atomic.

    Args:
        model: the quantized model (a transformers model, or any module with quantized layers).
        out_dir: the directory to create.
        source_dir: the original model directory whose tokenizer and other files to copy.
        overwrite: replace an existing ``out_dir``.
        max_shard_bytes: largest safetensors shard.
        provenance: what made the model, for the directory's integrity manifest (None: no manifest; a
            model quantized in Python has no record of its inputs unless the caller gives one).

    Returns:
        ``out_dir``.

    Raises:
        WeightkitError: the model has no quantized layer or layers of two formats, or ``out_dir`` exists
            and not ``overwrite``.
    """
    config = quantized_model_config(model)
    with CheckpointWriter(
        out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite, provenance=provenance
    ) as writer:
        if source_dir is not None:
            writer.copy_files(source_dir)
        for name, tensor in export_tensors(model):
            writer.add(name, tensor)
        write_generation_config(writer, model, source_dir)
        writer.write_json("config.json", config)
    return Path(out_dir)
