"""Dense bit packing of low-bit values: little-endian bit streams of bytes, and compressed-tensors' ``int32``
words built on them.

A stream of ``bits``-bit unsigned values is little-endian: value ``j`` occupies stream bits
``[j*bits, (j+1)*bits)``, its least significant bit first, and stream bit ``s`` is bit ``s % 8`` of byte
``s // 8``. Values may straddle bytes; the only padding is the zero bits that fill the last byte, so ``n``
values take ``ceil(n * bits / 8)`` bytes (:func:`pack_bits`, 1 to 16 bits, for VPTQ's codebook indices).

compressed-tensors' "pack-quantized" layout (so packed weights load unchanged in ``transformers`` and
vLLM) is that stream, per row, read as ``int32`` words (:func:`pack_int32`):

- a value ``q`` on the signed ``bits``-bit grid is stored unsigned, as ``q + 2^(bits-1)``;
- each row is one stream; bit ``k`` of word ``w`` is stream bit ``32*w + k``, so a row of ``cols``
  values takes ``ceil(cols * bits / 32)`` words (the last one zero-padded).

Zero points are packed along dim 0 there: pack them as ``pack_int32(zp.T, bits).T``.
"""

import math

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["pack_bits", "unpack_bits", "packed_bytes", "pack_int32", "unpack_int32", "packed_cols"]

MAX_STREAM_BITS = 16


def packed_bytes(count: int, bits: int) -> int:
    """Number of bytes that hold ``count`` values of ``bits`` bits in one stream."""
    return math.ceil(count * bits / 8)


def packed_cols(cols: int, bits: int) -> int:
    """Number of ``int32`` words that hold ``cols`` values of ``bits`` bits."""
    return math.ceil(cols * bits / 32)


def _check_stream_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_STREAM_BITS:
        raise WeightkitError(f"bit streams hold 1 to {MAX_STREAM_BITS} bits per value, got {bits}")


def _byte_positions(count: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """First byte and bit-in-byte of each of ``count`` values, and how many bytes a value can touch."""
    stream_bit = torch.arange(count, device=device, dtype=torch.int64) * bits
    # A value starting at bit 7 of a byte reaches 7 + bits - 1 bits further: at most 3 bytes for 16 bits.
    return stream_bit // 8, stream_bit % 8, (7 + bits + 7) // 8


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit values into little-endian byte streams, one per row (last dimension).

    Args:
        values: an integer tensor ``[..., n]``, each value in ``[0, 2^bits)``.
        bits: bits per value, 1 to 16.

    Returns:
        ``uint8 [..., ceil(n * bits / 8)]`` (module docstring).

    Raises:
        WeightkitError: ``values`` is not an integer tensor, or a value does not fit in ``bits`` bits.
    """
    _check_stream_bits(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool or values.dim() == 0:
        raise WeightkitError(
            f"pack_bits expects an integer tensor of at least one dimension, got {values.dtype} of shape "
            f"{tuple(values.shape)}"
        )
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise WeightkitError(
            f"values range over [{int(values.min())}, {int(values.max())}], outside the unsigned {bits}-bit "
            f"range [0, {(1 << bits) - 1}]; packing them would corrupt their neighbours"
        )
    count = values.shape[-1]
    first_byte, shift, spans = _byte_positions(count, bits, values.device)
    # int64 holds a value shifted by up to 7 bits; each byte of it lands in byte ``first_byte + t``. Every
    # stream bit comes from exactly one value, so adding the pieces is a bitwise OR.
    shifted = values.to(torch.int64) << shift
    out = torch.zeros(
        *values.shape[:-1], packed_bytes(count, bits) + spans, dtype=torch.int64, device=values.device
    )
    for t in range(spans):
        out.index_add_(-1, first_byte + t, (shifted >> (8 * t)) & 0xFF)
    return out[..., : packed_bytes(count, bits)].to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values of each stream, as ``int32 [..., count]``.

    Raises:
        WeightkitError: ``packed`` is not ``uint8``, or its streams have the wrong length for ``count``.
    """
    _check_stream_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise WeightkitError(
            f"unpack_bits expects a uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.shape[-1] != packed_bytes(count, bits):
        raise WeightkitError(
            f"{count} values of {bits} bits take {packed_bytes(count, bits)} bytes per stream, "
            f"but the packed tensor has {packed.shape[-1]}"
        )
    first_byte, shift, spans = _byte_positions(count, bits, packed.device)
    padded = torch.nn.functional.pad(packed.to(torch.int32), (0, spans))
    # At most 3 bytes (24 bits) per value: the window fits int32 with room to spare.
    window = sum(padded[..., first_byte + t] << (8 * t) for t in range(spans))
    return (window >> shift.to(torch.int32)) & ((1 << bits) - 1)


def _check_grid_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise WeightkitError(f"packing supports 1 to 8 bits per value, got {bits}")


def pack_int32(q: Tensor, bits: int) -> Tensor:
    """Pack signed grid values row by row into dense ``int32`` words.

    Args:
        q: ``int8`` grid values ``[rows, cols]``, each in ``[-2^(bits-1), 2^(bits-1) - 1]``.
        bits: bits per value, 1 to 8.

    Returns:
        ``int32`` tensor ``[rows, ceil(cols * bits / 32)]`` in compressed-tensors' layout (module
        docstring).

    Raises:
        WeightkitError: ``q`` is not a 2-D ``int8`` tensor, or a value does not fit in ``bits`` bits.
    """
    _check_grid_bits(bits)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise WeightkitError(f"pack_int32 expects a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    offset = 1 << (bits - 1)
    if q.numel() and (int(q.min()) < -offset or int(q.max()) > offset - 1):
        raise WeightkitError(
            f"values range over [{int(q.min())}, {int(q.max())}], outside the {bits}-bit grid "
            f"[{-offset}, {offset - 1}]; packing them would corrupt their neighbours"
        )
    # Rows pack independently, and the packing holds several int64 copies of what it packs (about 30 bytes
    # per value): a block of rows at a time keeps that to ~30 MB whatever the weight's size, so a streamed
    # quantization's peak memory is not dominated by packing its largest matrix.
    block = max(1, _PACK_BLOCK_VALUES // max(q.shape[1], 1))
    return torch.cat([_pack_rows(rows_block, bits, offset) for rows_block in q.split(block)])


# Values packed at a time by pack_int32.
_PACK_BLOCK_VALUES = 2**20


def _pack_rows(q: Tensor, bits: int, offset: int) -> Tensor:
    """:func:`pack_int32` of a block of rows (checked)."""
    rows, cols = q.shape
    stream = pack_bits(q.to(torch.int16) + offset, bits)
    stream = torch.nn.functional.pad(stream, (0, 4 * packed_cols(cols, bits) - stream.shape[1]))
    # Word w is bytes 4w .. 4w+3, least significant first; built arithmetically, not by a view, so the
    # result does not depend on the machine's byte order. int64 until the two's-complement wrap.
    byte_weight = torch.tensor([1, 1 << 8, 1 << 16, 1 << 24], dtype=torch.int64, device=q.device)
    words = (stream.reshape(rows, -1, 4).to(torch.int64) * byte_weight).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_int32`: the first ``cols`` values of each packed row.

    Args:
        packed: ``int32`` words ``[rows, ceil(cols * bits / 32)]``.
        bits: bits per value, 1 to 8.
        cols: number of values per row before packing.

    Returns:
        ``int8`` grid values ``[rows, cols]``.

    Raises:
        WeightkitError: ``packed`` is not 2-D ``int32`` or has the wrong number of words for ``cols``.
    """
    _check_grid_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise WeightkitError(
            f"unpack_int32 expects a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.shape[1] != packed_cols(cols, bits):
        raise WeightkitError(
            f"{cols} values of {bits} bits take {packed_cols(cols, bits)} int32 words per row, "
            f"but the packed tensor has {packed.shape[1]}"
        )
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=packed.device)
    stream = (
        ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(packed.shape[0], -1)
    )
    unsigned = unpack_bits(stream[:, : packed_bytes(cols, bits)], bits, cols)
    return (unsigned - (1 << (bits - 1))).to(torch.int8)
