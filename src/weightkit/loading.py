"""``weightkit.load``: the model in any Hugging Face directory weightkit writes.

Plain directories (merged, low-rank, ...) load through ``transformers``. Quantized directories in
compressed-tensors' "pack-quantized" format (what :func:`weightkit.compress.quant.export.save_quantized`
writes, and what llm-compressor writes for integer weight-only schemes) load into weightkit
``QuantizedLinear`` layers holding the exact stored grid values, scales and zero points, so they can be
inspected, re-exported or evaluated without a round trip through float weights.
"""

import os
from pathlib import Path

import torch
import transformers
from torch import nn

from weightkit.compress.quant.export import scheme_from_weights_args
from weightkit.compress.quant.grid import QuantizedWeight, QuantScheme
from weightkit.compress.quant.module import QuantizedLinear
from weightkit.compress.quant.pack import unpack_int32
from weightkit.errors import WeightkitError
from weightkit.models import CheckpointNames, skeleton

__all__ = ["load", "load_quantized", "is_quantized_checkpoint"]

_QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "bias")


def is_quantized_checkpoint(config: dict | None) -> bool:
    """Whether a ``config.json`` dict describes a compressed-tensors quantized checkpoint."""
    qc = (config or {}).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _model_class(config: dict):
    """The transformers class that wrote the checkpoint (``architectures[0]``), else an Auto class."""
    from weightkit.models import CAUSAL_LM_TYPES

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if config.get("model_type") in CAUSAL_LM_TYPES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def load(
    path: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load the model of a Hugging Face directory, offline, in eval mode (with an adapter applied).

    The class is the one named in ``config.json``'s ``architectures`` (so a ``BertForMaskedLM`` comes
    back as one). A compressed-tensors pack-quantized checkpoint comes back with ``QuantizedLinear``
    layers (see :func:`load_quantized`).

    Args:
        path: the model directory.
        adapter: a LoRA adapter directory in PEFT's format (saved by weightkit or PEFT) to apply.
        dtype: dtype of the floating-point weights (and quantization scales); ``None`` keeps the stored one.
        allow_pickle: accept pickle weights (``pytorch_model.bin``) for a plain directory; they are still
            read with ``weights_only`` loading.

    Raises:
        WeightkitError: no config.json, missing or corrupt weights, refused pickle, or a quantized format
            weightkit cannot represent.
    """
    from weightkit.checkpoint import CheckpointReader

    path = Path(path)
    reader = CheckpointReader(path, allow_pickle=allow_pickle)
    try:
        config = reader.config
        if config is None:
            raise WeightkitError(f"{path} has no config.json: it is not a Hugging Face model directory")
        model_cls = _model_class(config)
        if is_quantized_checkpoint(config):
            return load_quantized(path, model_cls=model_cls, dtype=dtype, reader=reader)
    finally:
        reader.close()
    model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype or "auto").eval()
    if adapter is not None:
        from weightkit.adapt import load_adapter

        load_adapter(model, adapter)
    return model


def _config_groups(qc: dict, path: Path) -> tuple[list[tuple[str, list[str], QuantScheme]], list[str]]:
    """``[(group name, targets, scheme)]`` and the ignore list of a pack-quantized quantization_config."""
    where = f"{path / 'config.json'} quantization_config"
    fmt = qc.get("format")
    groups = []
    for group_name, group in (qc.get("config_groups") or {}).items():
        group_format = group.get("format") or fmt
        if group_format != "pack-quantized":
            raise WeightkitError(
                f"{where} group {group_name}: format {group_format!r} is not supported by weightkit.load "
                f"(it reads 'pack-quantized'); load it with transformers instead"
            )
        if group.get("input_activations") or group.get("output_activations"):
            raise WeightkitError(f"{where} group {group_name}: activation quantization is not supported")
        if not group.get("weights"):
            raise WeightkitError(f"{where} group {group_name} has no weights scheme")
        scheme = scheme_from_weights_args(group["weights"], f"{where} group {group_name}")
        groups.append((group_name, list(group.get("targets") or []), scheme))
    if not groups:
        raise WeightkitError(f"{where} has no config_groups")
    return groups, list(qc.get("ignore") or [])


def _scheme_of(name: str, module: nn.Module, groups, ignore: list[str], path: Path) -> QuantScheme:
    """The scheme of the first config group whose targets match the module (compressed-tensors' rules)."""
    from compressed_tensors.utils.match import is_match

    if is_match(name, module, ignore):
        raise WeightkitError(
            f"{path}: {name} is stored packed but its quantization_config lists it in ignore"
        )
    for _, targets, scheme in groups:
        if is_match(name, module, targets):
            return scheme
    raise WeightkitError(
        f"{path}: {name}.weight_packed is stored but no quantization_config group targets {name}"
    )


def _quantized_linear(
    reader, ckpt_name: str, linear: nn.Linear, scheme: QuantScheme, dtype
) -> QuantizedLinear:
    """Rebuild one ``QuantizedLinear`` from its packed tensors, checking every shape against the layer."""
    out_features, in_features = linear.out_features, linear.in_features
    shape = [int(v) for v in reader.get(f"{ckpt_name}.weight_shape").tolist()]
    if shape != [out_features, in_features]:
        raise WeightkitError(
            f"{ckpt_name}.weight_shape is {shape} but the model's layer is [{out_features}, {in_features}]"
        )
    scale = reader.get(f"{ckpt_name}.weight_scale")
    groups = in_features // scheme.group_size if scheme.group_size else 1
    if tuple(scale.shape) != (out_features, groups):
        raise WeightkitError(
            f"{ckpt_name}.weight_scale has shape {tuple(scale.shape)}, expected ({out_features}, {groups}) "
            f"for {in_features} input columns and group size {scheme.group_size}"
        )
    qweight = unpack_int32(reader.get(f"{ckpt_name}.weight_packed"), scheme.bits, in_features)
    zero_point = None
    if not scheme.symmetric:
        zp_name = f"{ckpt_name}.weight_zero_point"
        if zp_name not in reader:
            raise WeightkitError(f"{ckpt_name} has an asymmetric scheme but {zp_name} is missing")
        # Zero points are packed along the output dimension (dim 0).
        zero_point = unpack_int32(
            reader.get(zp_name).T.contiguous(), scheme.bits, out_features
        ).T.contiguous()
    if dtype is not None:
        scale = scale.to(dtype)
    bias_name = f"{ckpt_name}.bias"
    bias = reader.get(bias_name) if bias_name in reader else None
    if (bias is None) != (linear.bias is None):
        raise WeightkitError(
            f"{bias_name}: the checkpoint and the model disagree on whether the layer has a bias"
        )
    if bias is not None and dtype is not None:
        bias = bias.to(dtype)
    return QuantizedLinear(QuantizedWeight(qweight, scale, zero_point, scheme), bias)


def load_quantized(
    path: str | os.PathLike,
    *,
    model_cls=None,
    dtype: torch.dtype | None = None,
    reader=None,
) -> nn.Module:
    """Load a compressed-tensors pack-quantized directory into a model with ``QuantizedLinear`` layers.

    The model is built from ``config.json`` without its ``quantization_config`` (parameters on the meta
    device, so nothing is allocated twice), every packed layer becomes a ``QuantizedLinear`` with the
    unpacked grid values, scales and zero points, and the other tensors are loaded as stored.

    Args:
        path: the quantized model directory.
        model_cls: a transformers model class or Auto class; default from ``config.json``.
        dtype: dtype for the floating-point weights and scales; ``None`` keeps the stored ones.
        reader: an open ``CheckpointReader`` of ``path`` to reuse.

    Returns:
        The model in eval mode; ``model.config`` has no ``quantization_config``.

    Raises:
        WeightkitError: a group is not a static integer group/channel pack-quantized scheme, a tensor is
            missing or has the wrong shape, or the checkpoint has tensors the model does not.
    """
    from weightkit.checkpoint import CheckpointReader

    path = Path(path)
    own_reader = reader is None
    if own_reader:
        reader = CheckpointReader(path)
    try:
        config = reader.config
        if not is_quantized_checkpoint(config):
            raise WeightkitError(f"{path / 'config.json'} has no compressed-tensors quantization_config")
        groups, ignore = _config_groups(config["quantization_config"], path)
        if model_cls is None:
            model_cls = _model_class(config)
        return _build(path, reader, model_cls, groups, ignore, dtype)
    finally:
        if own_reader:
            reader.close()


def _build(path: Path, reader, model_cls, groups, ignore, dtype) -> nn.Module:
    model = skeleton(path, model_cls, dtype)
    names = CheckpointNames(model, reader.names())
    packed_modules = {
        names.to_model(n.removesuffix(".weight_packed"))
        for n in reader.names()
        if n.endswith(".weight_packed")
    }
    consumed: set[str] = set()
    for name in sorted(packed_modules):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise WeightkitError(
                f"{path}: the checkpoint has packed weights for {name}, a module the model lacks"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise WeightkitError(
                f"{path}: {name} is stored packed but is a {type(linear).__name__}, not a Linear"
            )
        ckpt_name = names.to_ckpt(name)
        scheme = _scheme_of(ckpt_name, linear, groups, ignore, path)
        model.set_submodule(name, _quantized_linear(reader, ckpt_name, linear, scheme, dtype))
        consumed.update(f"{ckpt_name}.{suffix}" for suffix in _QUANT_SUFFIXES)

    expected = set(model.state_dict())
    state = {}
    for ckpt_name in reader.names():
        if ckpt_name in consumed:
            continue
        name = names.to_model(ckpt_name)
        if name not in expected:
            if names.strip and not ckpt_name.startswith(names.strip):
                continue  # a task head's tensor, loading the bare model of a head checkpoint
            raise WeightkitError(f"{path}: tensor {ckpt_name} has no place in {type(model).__name__}")
        tensor = reader.get(ckpt_name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    # Tied weights (lm_head = embed_tokens) are stored once; re-tie them as the config says.
    model.tie_weights()
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise WeightkitError(
            f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}"
        )
    return model.eval()
