"""Per-layer quantization error of a compressed-tensors checkpoint against its full-precision model.

For each weight ``W`` of the base and its dequantized copy ``Ŵ`` from the quantized checkpoint:
:func:`sqnr_db` ``10 log10(||W||_F^2 / ||W - Ŵ||_F^2)`` (signal-to-quantization-noise ratio; about 6 dB per
bit for a uniform grid) and the relative error ``||W - Ŵ||_F / ||W||_F``.

``Ŵ`` is rebuilt one layer at a time from the raw tensors of compressed-tensors' ``pack-quantized`` format
(``NAME.weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``; the layout is described
in :mod:`weightkit.quantized.compressed_tensors`), as weightkit's ``compress`` and llm-compressor write it:
static integer weights with the ``group`` or ``channel`` strategy, symmetric or with zero points. The
model is never built. Everything else is refused by name: other formats (``float-quantized``,
``naive-quantized``, ``marlin-24``, ...), float/dynamic/block/tensor weights, activation ordering with
``g_idx``, activation quantization, sparsity (``sparse-24``) and transforms (their weights are stored in a
rotated basis), and checkpoints not in the ``compressed`` status. Tensors stored unquantized (ignored
layers, embeddings, norms) are compared as they are.
"""

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from weightkit.checkpoint import CheckpointReader
from weightkit.errors import WeightkitError
from weightkit.inspect.change import Table
from weightkit.quantized.compressed_tensors import (
    config_groups,
    is_quantized_checkpoint,
    refuse_quantized,
    scheme_of,
)
from weightkit.quantized.grid import QuantScheme, dequantize
from weightkit.quantized.pack import unpack_int32

__all__ = ["sqnr_db", "relative_error", "dequantize_packed", "quantization_error"]

# The tensors one pack-quantized layer NAME stores in place of NAME.weight.
_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_INSTEAD = "compare against the full-precision model it was made from"


def sqnr_db(weight: Tensor, approximation: Tensor) -> float:
    """``10 log10(||W||^2 / ||W - Ŵ||^2)`` in dB, in float64; ``inf`` when ``Ŵ == W``.

    Raises:
        WeightkitError: ``weight`` is all zeros (there is no signal to compare the noise with).
    """
    weight = weight.double()
    signal = float(weight.square().sum())
    if signal == 0:
        raise WeightkitError("the weight is all zeros: its signal-to-quantization-noise ratio is undefined")
    noise = float((weight - approximation.double()).square().sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def relative_error(weight: Tensor, approximation: Tensor) -> float | None:
    """``||W - Ŵ||_F / ||W||_F``; None when ``W`` is all zeros."""
    weight = weight.double()
    norm = torch.linalg.vector_norm(weight)
    if norm == 0:
        return None
    return float(torch.linalg.vector_norm(weight - approximation.double()) / norm)


def dequantize_packed(tensors: dict[str, Tensor], scheme: QuantScheme, layer: str) -> Tensor:
    """``Ŵ = (q - zp) * scale`` of one pack-quantized layer, in its scale's dtype (as the model computes).

    Args:
        tensors: the layer's stored tensors by suffix (``weight_packed``, ``weight_scale``, ``weight_shape``
            and, for an asymmetric scheme, ``weight_zero_point``).
        scheme: the layer's scheme from the checkpoint's ``quantization_config``.
        layer: the layer's name, for messages.

    Raises:
        WeightkitError: a tensor is missing or its shape disagrees with the scheme.
    """
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        if suffix not in tensors:
            raise WeightkitError(f"{layer}.{suffix} is missing from the quantized checkpoint")
    shape = tensors["weight_shape"].tolist()
    if len(shape) != 2:
        raise WeightkitError(f"{layer}.weight_shape is {shape}: only 2-D packed weights are read")
    rows, cols = (int(v) for v in shape)
    scheme.check_shape((rows, cols), f"{layer}.weight")
    groups = cols // scheme.group_size if scheme.group_size else 1
    scale = tensors["weight_scale"]
    if tuple(scale.shape) != (rows, groups):
        raise WeightkitError(
            f"{layer}.weight_scale has shape {tuple(scale.shape)}, expected ({rows}, {groups}) for {cols} "
            f"input columns and group size {scheme.group_size}"
        )
    qweight = unpack_int32(tensors["weight_packed"], scheme.bits, cols)
    if qweight.shape[0] != rows:
        raise WeightkitError(f"{layer}.weight_packed has {qweight.shape[0]} rows, weight_shape says {rows}")
    zero_point = None
    if not scheme.symmetric:
        if "weight_zero_point" not in tensors:
            raise WeightkitError(f"{layer} has an asymmetric scheme but {layer}.weight_zero_point is missing")
        # Zero points are packed along the output dimension (dim 0).
        zero_point = unpack_int32(tensors["weight_zero_point"].T.contiguous(), scheme.bits, rows).T
        if tuple(zero_point.shape) != (rows, groups):
            raise WeightkitError(
                f"{layer}.weight_zero_point has {zero_point.shape[1]} groups, expected {groups}"
            )
    elif "weight_zero_point" in tensors:
        raise WeightkitError(
            f"{layer}.weight_zero_point is stored but the quantization_config says the scheme is symmetric"
        )
    return dequantize(qweight, scale, zero_point)


def _refuse_unsupported(qc: dict, path: Path) -> None:
    """Refuse, by name, quantization_config features that change what the stored tensors mean."""
    where = f"{path / 'config.json'} quantization_config"
    if qc.get("quant_method") != "compressed-tensors":
        raise WeightkitError(
            f"{where}: quant_method {qc.get('quant_method')!r}, format {qc.get('format')!r} is not "
            "supported: the quantization error is measured on compressed-tensors pack-quantized checkpoints"
        )
    status = qc.get("quantization_status")
    if status != "compressed":
        raise WeightkitError(f"{where}: quantization_status {status!r} is not supported (only 'compressed')")
    # A group's own format overrides the top-level one (which reads "mixed-precision" when they differ).
    formats = {group.get("format") or qc.get("format") for group in (qc.get("config_groups") or {}).values()}
    unsupported = sorted(str(f) for f in formats - {"pack-quantized"})
    if unsupported:
        raise WeightkitError(
            f"{where}: format {', '.join(unsupported)} is not supported (only 'pack-quantized')"
        )
    # A "dense" sparsity_config only records that pruned weights are stored as they are (zeros included, as
    # weightkit's pruning stages write it); a compressed sparse format would have to be decompressed first.
    sparsity = qc.get("sparsity_config")
    if sparsity and sparsity.get("format") != "dense":
        raise WeightkitError(
            f"{where}: sparsity_config format {sparsity.get('format')!r} is not supported (only 'dense', "
            "weights stored with their zeros)"
        )
    if qc.get("transform_config"):
        raise WeightkitError(
            f"{where}: a transform_config is set ({qc['transform_config']}); transformed weights are not "
            "supported"
        )


def _row(name, shape, status, reason=None, scheme: QuantScheme | None = None, sqnr=None, error=None) -> dict:
    return {
        "name": name,
        "shape": list(shape),
        "status": status,
        "reason": reason,
        "quantized": scheme is not None,
        "bits": scheme.bits if scheme else None,
        "group_size": scheme.group_size if scheme else None,
        "symmetric": scheme.symmetric if scheme else None,
        "sqnr_db": sqnr,
        "relative_error": error,
    }


def _counterpart(name: str, q_reader: CheckpointReader) -> tuple[str | None, list[str]]:
    """The packed layer (or None) and the tensors of the quantized checkpoint that stand for base tensor
    ``name``: ``NAME.weight_packed`` ... for ``NAME.weight`` of a packed layer, else the same name."""
    layer = name.removesuffix(".weight")
    if name.endswith(".weight") and f"{layer}.weight_packed" in q_reader:
        return layer, [f"{layer}.{suffix}" for suffix in _PACKED_SUFFIXES if f"{layer}.{suffix}" in q_reader]
    return None, [name] if name in q_reader else []


def _stored_approximation(name: str, shape, q_reader, groups, ignore, path: Path):
    """``(scheme or None, Ŵ)`` for base tensor ``name`` from the quantized checkpoint, or the reason it
    has no counterpart there."""
    layer, names = _counterpart(name, q_reader)
    if layer is not None:
        tensors = {n.removeprefix(f"{layer}."): q_reader.get(n) for n in names}
        # compressed-tensors matches a group's targets against the module's name or class; only Linear
        # layers are packed, so a meta-device Linear stands in for the layer of the model not built here.
        scheme = scheme_of(layer, nn.Linear(1, 1, bias=False, device="meta"), groups, ignore, path)
        approximation = dequantize_packed(tensors, scheme, layer)
        if tuple(approximation.shape) != tuple(shape):
            return f"shape {tuple(shape)} in base but {tuple(approximation.shape)} packed"
        return scheme, approximation
    if not names:
        return "absent in the quantized checkpoint"
    if q_reader.shape(name) != shape or not q_reader.dtype(name).is_floating_point:
        return (
            f"shape {tuple(shape)} in base but {tuple(q_reader.shape(name))} {q_reader.dtype(name)} quantized"
        )
    return None, q_reader.get_finite(name)


def quantization_error(base: str | Path, quantized: str | Path) -> Table:
    """Per-layer error of the compressed-tensors checkpoint ``quantized`` against ``base``, streamed.

    A base tensor ``NAME.weight`` pairs with the layer ``NAME`` stored packed (``NAME.weight_packed`` ...)
    in ``quantized``; any other base tensor pairs with the tensor of the same name, stored as is.

    Row keys: ``name`` (the base tensor's name), ``shape``, ``status`` (``"compared"`` or ``"mismatch"``),
    ``reason``, ``quantized`` (whether it is stored packed), ``bits``, ``group_size`` (None: per channel),
    ``symmetric`` (None when not quantized), ``sqnr_db`` (:func:`sqnr_db`, ``inf`` for an exact copy, None
    for an all-zero weight), ``relative_error`` (:func:`relative_error`).

    Summary keys: ``quantized_layers``, ``sqnr_db`` (over all quantized layers as one vector:
    ``10 log10(sum ||W||^2 / sum ||W - Ŵ||^2)``), ``relative_error`` (likewise), ``mismatched``.

    Raises:
        WeightkitError: ``quantized`` is not a supported compressed-tensors checkpoint (module docstring),
            a packed layer is malformed, or a tensor holds NaN/Inf.
    """
    refuse_quantized(base, verb="the base of a quantization-error comparison", instead=_INSTEAD)
    quantized = Path(quantized)
    rows = []
    signal = noise = 0.0
    with CheckpointReader(base) as w_reader, CheckpointReader(quantized) as q_reader:
        config = q_reader.config
        if not is_quantized_checkpoint(config):
            raise WeightkitError(f"{quantized / 'config.json'} has no compressed-tensors quantization_config")
        qc = config["quantization_config"]
        _refuse_unsupported(qc, quantized)
        groups, ignore = config_groups(qc, quantized)
        consumed = set()
        for name in q_reader.names():
            if name.endswith("_g_idx"):
                raise WeightkitError(f"{quantized}: {name} (activation ordering with g_idx) is not supported")
        for name in w_reader.names():
            shape = w_reader.shape(name)
            consumed.update(_counterpart(name, q_reader)[1])
            if not w_reader.dtype(name).is_floating_point:
                rows.append(
                    _row(name, shape, "mismatch", f"not a floating-point tensor ({w_reader.dtype(name)})")
                )
                continue
            paired = _stored_approximation(name, shape, q_reader, groups, ignore, quantized)
            if isinstance(paired, str):
                rows.append(_row(name, shape, "mismatch", paired))
                continue
            scheme, approximation = paired
            weight = w_reader.get_finite(name)
            sqnr = sqnr_db(weight, approximation) if weight.any() else None
            rows.append(
                _row(name, shape, "compared", None, scheme, sqnr, relative_error(weight, approximation))
            )
            if scheme is not None:
                signal += float(weight.double().square().sum())
                noise += float((weight.double() - approximation.double()).square().sum())
        for name in q_reader.names():
            if name not in consumed:
                rows.append(_row(name, q_reader.shape(name), "mismatch", "absent in base"))
    quantized_rows = [row for row in rows if row["quantized"] and row["status"] == "compared"]
    summary = {
        "quantized_layers": len(quantized_rows),
        "sqnr_db": (math.inf if noise == 0 else 10 * math.log10(signal / noise)) if signal else None,
        "relative_error": math.sqrt(noise / signal) if signal else None,
        "mismatched": sum(row["status"] == "mismatch" for row in rows),
    }
    return Table(rows, summary)
