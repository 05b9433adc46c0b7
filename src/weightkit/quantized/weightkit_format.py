"""weightkit's own checkpoint format, for the compressed layers compressed-tensors has no format for: VPTQ's
vector codebooks (format "vptq"), GWQ's integer grid plus sparse 16-bit outliers (format "gwq") and
low-rank factor pairs (format "lowrank", whose layout is :mod:`weightkit.quantized.lowrank`'s); the
weight-sharing layers' format "shared" is laid out in :mod:`weightkit.quantized.shared`, BitStack's residual
blocks (format "bitstack") in :mod:`weightkit.quantized.bitstack`.

Only :func:`weightkit.load` reads it. It is built so that loaders that do not know it fail loudly:
transformers 5 skips an unknown ``quant_method`` with a mere warning and would otherwise run the model
with randomly initialised layers, so every quantized layer ``NAME`` stores 1-D data under ``NAME.weight``,
which transformers refuses with a size-mismatch error (tested).

``config.json``'s ``quantization_config``::

    {"quant_method": "weightkit", "format": "vptq" | "gwq" | "lowrank", "weightkit_version": "...",
     # gwq only: the grid, as compressed-tensors describes a pack-quantized one
     "config_groups": {...}, "ignore": [...]}

One format per checkpoint. The tensors of a quantized linear layer ``NAME``:

- vptq (:class:`~weightkit.quantized.codebook.VPTQWeight`):
  ``NAME.weight``: the indices ``[out // v, in]``, row-major, as one 1-D ``uint8`` little-endian bit
  stream of ``log2(k)`` bits per index (:func:`~weightkit.quantized.pack.pack_bits`);
  ``NAME.weight_codebook``: ``float16 [k, v]``; ``NAME.weight_shape``: ``int64 [2]``, ``[out, in]``;
  with a residual codebook ``NAME.weight_residual`` (the residual indices' bit stream, ``log2(k_r)`` bits
  each) and ``NAME.weight_residual_codebook`` (``float16 [k_r, v]``); ``NAME.bias`` if any.
- gwq (:class:`~weightkit.quantized.outliers.SparseOutlierWeight`): the grid exactly as compressed-tensors'
  pack-quantized layout stores it (``NAME.weight_packed``, ``weight_scale``, ``weight_shape``,
  ``weight_zero_point`` for an asymmetric grid, see :mod:`weightkit.quantized.compressed_tensors`),
  ``NAME.weight``: the outlier values, ``float16`` or ``bfloat16`` ``[k]`` (``k`` may be 0), and
  ``NAME.weight_outlier_index``: ``int32 [k]``, their ascending row-major positions in ``[out, in]``;
  ``NAME.bias`` if any.

Writing: :func:`vptq_tensors`, :func:`outlier_tensors`, :func:`weightkit_quantization_config`. Reading:
:func:`weightkit_format`, :func:`vptq_weight_from_stored` and :func:`outlier_weight_from_stored` check
every dtype and shape against the model's layer and name the tensor that is wrong.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from weightkit.errors import WeightkitError, require_finite
from weightkit.quantized.codebook import CODEBOOK_DTYPE, VPTQSpec, VPTQWeight
from weightkit.quantized.compressed_tensors import packed_tensors, quantization_config
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.quantized.outliers import SparseOutlierWeight
from weightkit.quantized.pack import pack_bits, packed_bytes, unpack_bits

__all__ = [
    "QUANT_METHOD",
    "FORMATS",
    "VPTQ_SUFFIXES",
    "GWQ_SUFFIXES",
    "vptq_tensors",
    "outlier_tensors",
    "weightkit_quantization_config",
    "weightkit_format",
    "vptq_weight_from_stored",
    "outlier_weight_from_stored",
]

QUANT_METHOD = "weightkit"
# "lowrank", "shared" and "bitstack" are laid out in weightkit.quantized.lowrank / .shared / .bitstack, which
# build on this module.
FORMATS = ("vptq", "gwq", "lowrank", "shared", "bitstack")
# The tensors one quantized layer NAME stores, as NAME.<suffix>.
VPTQ_SUFFIXES = (
    "weight",
    "weight_codebook",
    "weight_shape",
    "weight_residual",
    "weight_residual_codebook",
    "bias",
)
GWQ_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_shape",
    "weight_zero_point",
    "weight",
    "weight_outlier_index",
    "bias",
)
OUTLIER_VALUE_DTYPES = (torch.float16, torch.bfloat16)


def _index_bits(codewords: int) -> int:
    """Bits of an index into a codebook of ``codewords`` (a power of two, checked by ``VPTQSpec``)."""
    return codewords.bit_length() - 1


def vptq_tensors(quantized: VPTQWeight, bias: Tensor | None) -> dict[str, Tensor]:
    """One vector-quantized weight (and its layer's bias) as the "vptq" format stores it (module docstring).

    Raises:
        WeightkitError: a codebook is not float16, or an index does not fit its codebook.
    """
    spec = quantized.spec
    groups, cols = quantized.indices.shape
    out = {
        "weight": _pack_indices(quantized.indices, quantized.codebook, "indices"),
        "weight_codebook": quantized.codebook.detach().cpu(),
        "weight_shape": torch.tensor([groups * spec.vector_length, cols], dtype=torch.int64),
    }
    if quantized.residual_codebook is not None:
        residual = _pack_indices(quantized.residual_indices, quantized.residual_codebook, "residual indices")
        out["weight_residual"] = residual
        out["weight_residual_codebook"] = quantized.residual_codebook.detach().cpu()
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    return out


def _pack_indices(indices: Tensor, codebook: Tensor, what: str) -> Tensor:
    if codebook.dtype != CODEBOOK_DTYPE:
        raise WeightkitError(
            f"VPTQ codebooks are stored in {CODEBOOK_DTYPE}, got a {codebook.dtype} codebook"
        )
    # pack_bits refuses an index outside [0, k): log2(k) bits hold exactly the codebook's indices.
    return pack_bits(indices.detach().cpu().reshape(-1), _index_bits(codebook.shape[0]))


def outlier_tensors(quantized: SparseOutlierWeight, bias: Tensor | None) -> dict[str, Tensor]:
    """One grid-plus-outliers weight (and its layer's bias) as the "gwq" format stores it: the grid in
    compressed-tensors' pack-quantized layout, the outlier values under ``weight`` and their positions
    under ``weight_outlier_index``.

    Raises:
        WeightkitError: outlier values that are not float16/bfloat16 or positions that are not int32.
    """
    values, index = quantized.outlier_value, quantized.outlier_index
    if values.dtype not in OUTLIER_VALUE_DTYPES or index.dtype != torch.int32:
        raise WeightkitError(
            f"GWQ outliers are stored as float16/bfloat16 values at int32 positions, got {values.dtype} "
            f"values at {index.dtype} positions"
        )
    return {
        **packed_tensors(quantized.dense, bias),
        "weight": values.detach().cpu(),
        "weight_outlier_index": index.detach().cpu(),
    }


def weightkit_quantization_config(fmt: str, grids: Mapping[str, QuantScheme], ignore: list[str]) -> dict:
    """The ``quantization_config`` of a checkpoint in format ``fmt`` ("vptq", "gwq" or "lowrank").

    Args:
        fmt: the format of every quantized layer.
        grids: for "gwq", quantized module name -> its grid's scheme (described as compressed-tensors
            describes a pack-quantized grid, by :func:`~weightkit.quantized.compressed_tensors.
            quantization_config`); ignored for "vptq", whose codebooks describe themselves.
        ignore: the linear layers left unquantized ("gwq": listed in ``ignore``, as compressed-tensors
            does).
    """
    if fmt not in FORMATS:
        raise WeightkitError(f"weightkit checkpoint format {fmt!r} is not one of {', '.join(FORMATS)}")
    from weightkit import __version__  # the package imports this module: read its version lazily

    config = {"quant_method": QUANT_METHOD, "format": fmt, "weightkit_version": __version__}
    if fmt == "gwq":
        grid = quantization_config(dict(grids), ignore)
        config.update(config_groups=grid["config_groups"], ignore=grid["ignore"])
    return config


def weightkit_format(qc: dict, where: str) -> str:
    """The format ("vptq", "gwq" or "lowrank") of a weightkit ``quantization_config``; anything else is
    refused, naming ``where`` (e.g. the config.json's path)."""
    fmt = qc.get("format")
    if qc.get("quant_method") != QUANT_METHOD or fmt not in FORMATS:
        raise WeightkitError(
            f"{where}: quantization_config with quant_method {qc.get('quant_method')!r} and format {fmt!r} "
            f"is not a weightkit checkpoint format (quant_method {QUANT_METHOD!r}, format "
            f"{' or '.join(map(repr, FORMATS))})"
        )
    return fmt


def _check(
    tensor: Tensor, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None, dims: int
):
    """Refuse, naming it, a stored tensor of another dtype, number of dimensions or (if given) shape."""
    if (
        tensor.dtype not in dtypes
        or tensor.dim() != dims
        or (shape is not None and tuple(tensor.shape) != shape)
    ):
        expected = " or ".join(map(str, dtypes)) + (
            f" of shape {shape}" if shape is not None else f" {dims}-D"
        )
        raise WeightkitError(f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}, expected {expected}")


def _codebook(stored: Mapping[str, Tensor], key: str, name: str) -> Tensor:
    """A stored codebook, refused unless it is a finite float16 matrix."""
    codebook = stored[key]
    _check(codebook, f"{name}.{key}", (CODEBOOK_DTYPE,), None, 2)
    require_finite(codebook, f"{name}.{key}")
    return codebook


def vptq_weight_from_stored(stored: Mapping[str, Tensor], shape: tuple[int, int], name: str) -> VPTQWeight:
    """The :class:`VPTQWeight` of the layer ``name`` from its stored tensors, checked against ``shape``.

    Args:
        stored: suffix (``"weight"``, ``"weight_codebook"`` ...) -> tensor, the layer's stored tensors.
        shape: the model layer's ``[out, in]``.
        name: the layer's name in the checkpoint, for errors.

    Raises:
        WeightkitError: a tensor is missing or has the wrong dtype or shape (``weight_shape`` other than
            ``shape``, a codebook that is not float16 ``[k, v]`` with ``k`` a power of two up to 2^16 and
            ``v`` dividing ``out``, a bit stream of another length than ``log2(k)`` bits per index), a
            residual bit stream without its codebook or the other way round, or a non-finite codeword.
    """
    for key in ("weight", "weight_codebook", "weight_shape"):
        if key not in stored:
            raise WeightkitError(f"{name}.{key} is missing: the checkpoint's format is weightkit vptq")
    if ("weight_residual" in stored) != ("weight_residual_codebook" in stored):
        raise WeightkitError(
            f"{name}: weight_residual and weight_residual_codebook go together; the checkpoint has only "
            f"{'weight_residual' if 'weight_residual' in stored else 'weight_residual_codebook'}"
        )
    _check(stored["weight_shape"], f"{name}.weight_shape", (torch.int64,), (2,), 1)
    stored_shape = [int(v) for v in stored["weight_shape"].tolist()]
    if stored_shape != list(shape):
        raise WeightkitError(f"{name}.weight_shape is {stored_shape} but the model's layer is {list(shape)}")
    codebook = _codebook(stored, "weight_codebook", name)
    residual_codebook = None
    if "weight_residual" in stored:
        residual_codebook = _codebook(stored, "weight_residual_codebook", name)
        if residual_codebook.shape[1] != codebook.shape[1]:
            raise WeightkitError(
                f"{name}.weight_residual_codebook has vectors of length {residual_codebook.shape[1]}, "
                f"{name}.weight_codebook of length {codebook.shape[1]}: they must be equal"
            )
    # Codeword counts (powers of two up to 2^16), v dividing out, no codebook larger than the layer.
    residual_centroids = 0 if residual_codebook is None else residual_codebook.shape[0]
    try:
        spec = VPTQSpec(codebook.shape[1], codebook.shape[0], residual_centroids)
        spec.check_shape(shape, "the layer")
    except WeightkitError as err:
        codebooks = "weight_codebook" + (" and weight_residual_codebook" if residual_centroids else "")
        raise WeightkitError(f"{name}.{codebooks} do not fit the layer {list(shape)}: {err}") from None
    groups = shape[0] // spec.vector_length
    indices = _unpack_indices(stored["weight"], spec.centroids, (groups, shape[1]), f"{name}.weight")
    if residual_codebook is None:
        return VPTQWeight(indices, codebook)
    residual_indices = _unpack_indices(
        stored["weight_residual"], spec.residual_centroids, (groups, shape[1]), f"{name}.weight_residual"
    )
    return VPTQWeight(indices, codebook, residual_indices, residual_codebook)


def _unpack_indices(stream: Tensor, codewords: int, shape: tuple[int, int], name: str) -> Tensor:
    """Indices ``int32 shape`` from their bit stream; ``log2(codewords)`` bits each can only hold indices
    of the codebook, so a stream of the right length holds no index out of range."""
    bits = _index_bits(codewords)
    count = shape[0] * shape[1]
    _check(stream, name, (torch.uint8,), (packed_bytes(count, bits),), 1)
    return unpack_bits(stream, bits, count).reshape(shape)


def outlier_weight_from_stored(
    dense: QuantizedWeight, values: Tensor, index: Tensor, name: str
) -> SparseOutlierWeight:
    """The :class:`SparseOutlierWeight` of the layer ``name`` from its grid and its stored outliers.

    Args:
        dense: the layer's grid, read from its pack-quantized tensors.
        values: ``NAME.weight``, the outlier values.
        index: ``NAME.weight_outlier_index``, their row-major positions.
        name: the layer's name in the checkpoint, for errors.

    Raises:
        WeightkitError: values that are not 1-D float16/bfloat16 or not finite, positions that are not 1-D
            int32 of the same length, lie outside the ``[out, in]`` weight or are not strictly ascending
            (which also makes them unique).
    """
    _check(values, f"{name}.weight", OUTLIER_VALUE_DTYPES, None, 1)
    _check(index, f"{name}.weight_outlier_index", (torch.int32,), tuple(values.shape), 1)
    require_finite(values, f"{name}.weight")
    numel = dense.qweight.numel()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise WeightkitError(
            f"{name}.weight_outlier_index holds positions from {int(index.min())} to {int(index.max())}, "
            f"outside the {numel} entries of the {list(dense.qweight.shape)} weight"
        )
    if bool((index[1:] <= index[:-1]).any()):
        raise WeightkitError(
            f"{name}.weight_outlier_index is not strictly ascending: positions must be sorted and unique"
        )
    return SparseOutlierWeight(dense, index, values)
