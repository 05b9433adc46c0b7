"""Dense bit packing of low-bit grid values into ``int32`` words.

The layout is compressed-tensors' "pack-quantized" layout, so packed weights load unchanged in
``transformers`` and vLLM:

- a value ``q`` on the signed ``bits``-bit grid is stored unsigned, as ``q + 2^(bits-1)``;
- each row is one little-endian bit stream: element ``j`` occupies bits ``[j*bits, (j+1)*bits)``
  of the stream, and bit ``k`` of word ``w`` is stream bit ``32*w + k``;
- values may straddle two words; the only padding is the zero bits that fill the row's last word,
  so a row of ``cols`` values takes ``ceil(cols * bits / 32)`` words.

Zero points are packed along dim 0 there: pack them as ``pack_int32(zp.T, bits).T``.
"""

import math

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = ["pack_int32", "unpack_int32", "packed_cols"]


def packed_cols(cols: int, bits: int) -> int:
    """Number of ``int32`` words that hold ``cols`` values of ``bits`` bits."""
    return math.ceil(cols * bits / 32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise WeightkitError(f"packing supports 1 to 8 bits per value, got {bits}")


def _bit_positions(cols: int, bits: int, plane: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Word index and bit-in-word of bit ``plane`` of every element of a row."""
    stream_bit = torch.arange(cols, device=device, dtype=torch.int64) * bits + plane
    return stream_bit // 32, stream_bit % 32


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
    _check_bits(bits)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise WeightkitError(f"pack_int32 expects a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    offset = 1 << (bits - 1)
    if q.numel() and (int(q.min()) < -offset or int(q.max()) > offset - 1):
        raise WeightkitError(
            f"values range over [{int(q.min())}, {int(q.max())}], outside the {bits}-bit grid "
            f"[{-offset}, {offset - 1}]; packing them would corrupt their neighbours"
        )
    rows, cols = q.shape
    unsigned = q.to(torch.int64) + offset
    # int64 accumulation: every stream bit is set by exactly one element, so adding the shifted bits
    # is a bitwise OR, and bit 31 does not overflow before the final two's-complement wrap below.
    words = torch.zeros(rows, packed_cols(cols, bits), dtype=torch.int64, device=q.device)
    for plane in range(bits):
        word, shift = _bit_positions(cols, bits, plane, q.device)
        words.index_add_(1, word, ((unsigned >> plane) & 1) << shift)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


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
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise WeightkitError(
            f"unpack_int32 expects a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.shape[1] != packed_cols(cols, bits):
        raise WeightkitError(
            f"{cols} values of {bits} bits take {packed_cols(cols, bits)} int32 words per row, "
            f"but the packed tensor has {packed.shape[1]}"
        )
    unsigned = torch.zeros(packed.shape[0], cols, dtype=torch.int32, device=packed.device)
    for plane in range(bits):
        word, shift = _bit_positions(cols, bits, plane, packed.device)
        # Arithmetic right shift sign-extends negative words; the "& 1" keeps only the wanted bit.
        unsigned |= ((packed[:, word] >> shift.to(torch.int32)) & 1) << plane
    return (unsigned - (1 << (bits - 1))).to(torch.int8)
