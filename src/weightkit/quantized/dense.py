"""Expand a checkpoint of weightkit's compressed layers into an ordinary, dense Hugging Face checkpoint
(``weightkit export --dense``), for tools that read only plain weights.

Every layer that offers ``dense_weight()`` (each weightkit layer: the quantized ones, ``LowRankLinear`` ...)
becomes a plain ``nn.Linear`` holding that weight in the model's dtype, so a new compressed layer type needs
nothing here. The output loads in transformers and computes what :func:`weightkit.load` of the input does,
up to the rounding of the dense product into the model's dtype (tested).
"""

import os

import torch
from torch import nn

from weightkit.checkpoint import CheckpointWriter, ModelCard, Provenance
from weightkit.errors import WeightkitError
from weightkit.models import load
from weightkit.quantized.formats import export_tensors, plain_model_config

__all__ = ["densify", "export_dense"]


def densify(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace, in place, every layer of ``model`` that has ``dense_weight()`` by an ``nn.Linear`` holding
    that weight (and the layer's bias) in ``dtype``; returns the replaced layers' names."""
    layers = [(name, m) for name, m in model.named_modules() if callable(getattr(m, "dense_weight", None))]
    for name, layer in layers:
        with torch.no_grad():
            weight = layer.dense_weight().to(dtype)
        bias = getattr(layer, "bias", None)
        linear = nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=dtype
        )
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    return [name for name, _ in layers]


def export_dense(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Write the compressed checkpoint ``model_dir`` as an ordinary dense checkpoint at ``out_dir``.

    The model is loaded with :func:`weightkit.load`, its compressed layers replaced by plain ones
    (:func:`densify`), and written atomically: safetensors shards, ``config.json`` without a
    ``quantization_config``, the tokenizer and other files of ``model_dir``, a model card.

    Returns:
        The names of the layers that were expanded.

    Raises:
        WeightkitError: ``model_dir`` is not a model directory, or holds no compressed layer (it is
            dense already); ``out_dir`` exists and not ``overwrite``. Nothing is written then.
    """
    model = load(model_dir)
    dtype = getattr(model, "dtype", None) or torch.get_default_dtype()
    expanded = densify(model, dtype)
    if not expanded:
        raise WeightkitError(
            f"{model_dir} holds no compressed layer (weightkit's low-rank or quantized layers): it is a "
            "dense checkpoint already, which transformers loads as it is"
        )
    # export --dense has no settings: the output is decided by the input alone.
    provenance = Provenance("export", "dense", {}, (model_dir,))
    with CheckpointWriter(
        out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite, provenance=provenance
    ) as writer:
        writer.copy_files(model_dir)
        writer.write_model_card(ModelCard("export", "dense", [str(model_dir)]))
        for name, tensor in export_tensors(model):
            writer.add(name, tensor)
        writer.write_json("config.json", plain_model_config(model))
    return expanded
