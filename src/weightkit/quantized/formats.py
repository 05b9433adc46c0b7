"""Which checkpoint format stores which quantized layer, and a whole model's tensors and ``config.json``.

- ``QuantizedLinear`` (integer grid) and ``FloatQuantizedLinear`` (FP8/FP4): compressed-tensors
  (:mod:`weightkit.quantized.compressed_tensors`), which transformers and vLLM load;
- ``VPTQLinear`` (codebooks) and ``OutlierQuantizedLinear`` (grid plus 16-bit outliers): weightkit's own
  format "vptq" / "gwq" (:mod:`weightkit.quantized.weightkit_format`), which compressed-tensors has no
  equivalent of and only :func:`weightkit.load` reads;
- ``SharedLinear`` (atoms shared between layers): weightkit's format "shared"
  (:mod:`weightkit.quantized.shared`);
- ``LowRankLinear`` (two low-rank factors): weightkit's format "lowrank" (:mod:`weightkit.quantized.lowrank`);
- ``BitStackLinear`` (residual blocks of signs and vectors): weightkit's format "bitstack"
  (:mod:`weightkit.quantized.bitstack`), whose ``quantization_config`` also holds the universal block order.

A checkpoint holds one format: a model mixing layers of two formats is refused, naming a layer of each.
The layer types and their stored forms are listed once here (:data:`LAYER_FORMATS`, :func:`stored_tensors`),
so a layer type without a format is refused by name instead of being written as another.
"""

from collections.abc import Iterator

import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.quantized.bitstack import (
    BitStackLinear,
    BitStackWeight,
    bitstack_quantization_config,
    bitstack_tensors,
)
from weightkit.quantized.codebook import VPTQWeight
from weightkit.quantized.compressed_tensors import float_tensors, packed_tensors, quantization_config
from weightkit.quantized.float_grid import FloatQuantizedWeight
from weightkit.quantized.grid import QuantizedWeight
from weightkit.quantized.linear import (
    FloatQuantizedLinear,
    OutlierQuantizedLinear,
    QuantizedLinear,
    VPTQLinear,
)
from weightkit.quantized.lowrank import LowRankLinear, LowRankWeight, lowrank_tensors
from weightkit.quantized.outliers import SparseOutlierWeight
from weightkit.quantized.shared import SharedLinear, shared_quantization_config, shared_tensors
from weightkit.quantized.weightkit_format import outlier_tensors, vptq_tensors, weightkit_quantization_config

__all__ = [
    "LAYER_FORMATS",
    "export_tensors",
    "plain_model_config",
    "quantized_model_config",
    "stored_tensors",
]

COMPRESSED_TENSORS = "compressed-tensors"
# Layer type -> the checkpoint format that stores it (weightkit's own formats by their "format" name).
LAYER_FORMATS: dict[type[nn.Module], str] = {
    QuantizedLinear: COMPRESSED_TENSORS,
    FloatQuantizedLinear: COMPRESSED_TENSORS,
    VPTQLinear: "vptq",
    OutlierQuantizedLinear: "gwq",
    SharedLinear: "shared",
    LowRankLinear: "lowrank",
    BitStackLinear: "bitstack",
}
_QUANTIZED_LAYERS = tuple(LAYER_FORMATS)
# Stored weight type -> its tensors in its layer's format.
_STORED = {
    QuantizedWeight: packed_tensors,
    FloatQuantizedWeight: float_tensors,
    VPTQWeight: vptq_tensors,
    SparseOutlierWeight: outlier_tensors,
    LowRankWeight: lowrank_tensors,
    BitStackWeight: bitstack_tensors,
}


def stored_tensors(
    quantized: QuantizedWeight | FloatQuantizedWeight | VPTQWeight | SparseOutlierWeight,
    bias: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """One quantized weight (and its layer's bias) as its checkpoint format stores it, by the weight's type:
    compressed-tensors' pack-quantized (integer grid) or float layouts, weightkit's vptq, gwq or lowrank
    layout.

    Raises:
        WeightkitError: a weight type no format stores.
    """
    store = _STORED.get(type(quantized))
    if store is None:
        raise WeightkitError(
            f"a {type(quantized).__name__} has no checkpoint format (weightkit stores "
            f"{', '.join(t.__name__ for t in _STORED)})"
        )
    return store(quantized, bias)


def _quantized_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The quantized layers of ``module`` by name; a subclass of one (which might hold more than its
    parent's stored form) is refused rather than stored as its parent."""
    layers = {name: m for name, m in module.named_modules() if isinstance(m, _QUANTIZED_LAYERS)}
    for name, layer in layers.items():
        if type(layer) not in LAYER_FORMATS:
            raise WeightkitError(
                f"{name} is a {type(layer).__name__}, a subclass of a quantized layer that weightkit has no "
                "checkpoint format for"
            )
    return layers


def export_tensors(
    module: nn.Module, prefix: str = "", *, skip: tuple[str, ...] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``module`` as its checkpoint stores them.

    Plain tensors come as they are (tensors sharing storage, i.e. tied embeddings, only under their first
    name, as ``save_pretrained`` does); each quantized layer comes in its format's layout
    (:func:`stored_tensors`). Names get ``prefix``; submodules whose names start with an entry of ``skip``
    are left out.
    """
    quantized = _quantized_layers(module)
    quantized_prefixes = tuple(f"{name}." for name in quantized)
    skip = tuple(f"{s}." for s in skip)
    seen: set[tuple[int, torch.dtype, tuple[int, ...]]] = set()
    for name, tensor in module.state_dict().items():
        if name.startswith(quantized_prefixes) or name.startswith(skip):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # a tied weight: the loader re-ties it from the config
        seen.add(key)
        yield prefix + name, tensor.detach()
    shared = {}
    for name, layer in quantized.items():
        if name.startswith(skip):
            continue
        if isinstance(layer, SharedLinear):
            shared[name] = layer  # atoms are stored once for all their layers: written together below
            continue
        for suffix, tensor in stored_tensors(layer.quantized, layer.bias).items():
            yield f"{prefix}{name}.{suffix}", tensor
    yield from shared_tensors(shared, prefix)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in the model (what transformers calls its dtype)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def plain_model_config(model: nn.Module) -> dict:
    """The model's HF config as config.json would hold it, without a ``quantization_config``, or ``{}`` for
    a plain module."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    data = config.to_dict()
    data.pop("quantization_config", None)
    dtype = _float_dtype(model)
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    return data


def quantized_model_config(model: nn.Module) -> dict:
    """``config.json`` for ``model`` after quantization: its HF config plus the ``quantization_config``.

    compressed-tensors' block for ``QuantizedLinear`` / ``FloatQuantizedLinear`` layers (each described by
    its scheme), weightkit's "vptq" block for ``VPTQLinear`` layers, its "gwq" block for
    ``OutlierQuantizedLinear`` ones; every remaining ``nn.Linear`` is ignored. Works on a model whose
    parameters are on the meta device (only types, names, schemes and dtypes are read).

    Raises:
        WeightkitError: the model has no quantized layers, layers of two formats (named), or a scheme that
            cannot be saved (E5M2).
    """
    layers = _quantized_layers(model)
    if not layers:
        raise WeightkitError("the model has no quantized layers: quantize it before saving it")
    first_of_format: dict[str, str] = {}
    for name, layer in layers.items():
        first_of_format.setdefault(LAYER_FORMATS[type(layer)], name)
    if len(first_of_format) > 1:
        held = [
            f"{type(layers[name]).__name__} ({name}, format {fmt})" for fmt, name in first_of_format.items()
        ]
        raise WeightkitError(
            f"the model holds {' and '.join(held)} layers: one checkpoint holds one format, and "
            "compressed-tensors, weightkit vptq and weightkit gwq layers cannot be stored together; "
            "quantize every layer with one method family"
        )
    (fmt,) = first_of_format
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = plain_model_config(model)
    if fmt == "bitstack":
        config["quantization_config"] = bitstack_quantization_config(layers)
    elif fmt == COMPRESSED_TENSORS:
        config["quantization_config"] = quantization_config(
            {name: m.scheme for name, m in layers.items()}, ignore
        )
    elif fmt == "shared":
        config["quantization_config"] = shared_quantization_config(layers, ignore)
    else:
        grids = {name: m.scheme for name, m in layers.items() if isinstance(m, OutlierQuantizedLinear)}
        config["quantization_config"] = weightkit_quantization_config(fmt, grids, ignore)
    return config
