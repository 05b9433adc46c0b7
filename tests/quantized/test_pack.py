"""Tests for weightkit.quantized.pack: compressed-tensors' dense int32 layout."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from weightkit.errors import WeightkitError
from weightkit.quantized.pack import (
    pack_bits,
    pack_int32,
    packed_bytes,
    packed_cols,
    unpack_bits,
    unpack_int32,
)


def random_grid(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    return torch.randint(-half, half, (rows, cols), generator=g, dtype=torch.int8)


def pack_reference(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit loop over the stream: element j's bit b goes to stream bit j*bits + b."""
    rows, cols = q.shape
    n_words = -(-cols * bits // 32)
    out = torch.zeros(rows, n_words, dtype=torch.int32)
    for r in range(rows):
        words = [0] * n_words
        for j in range(cols):
            u = int(q[r, j]) + (1 << (bits - 1))
            for b in range(bits):
                pos = j * bits + b
                words[pos // 32] |= ((u >> b) & 1) << (pos % 32)
        out[r] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
    return out


SHAPES = [(3, 32), (5, 64), (4, 7), (2, 33), (6, 100), (1, 1)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_bit_exact(bits, shape):
    q = random_grid(*shape, bits, seed=bits * 100 + shape[1])
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], -(-shape[1] * bits // 32)) == (shape[0], packed_cols(shape[1], bits))
    assert torch.equal(unpack_int32(packed, bits, shape[1]), q)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_compressed_tensors(bits, shape):
    q = random_grid(*shape, bits, seed=bits + shape[1])
    packed = pack_int32(q, bits)
    assert torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(unpack_from_int32(packed, bits, q.shape), q)
    assert torch.equal(unpack_int32(pack_to_int32(q, bits), bits, shape[1]), q)


@pytest.mark.parametrize("bits", [3, 4])
def test_a_matrix_packed_in_blocks_of_rows_matches_compressed_tensors(bits):
    """pack_int32 packs ~2^20 values at a time (its memory); a matrix of several such blocks, the last one
    short, packs as compressed-tensors packs it whole."""
    q = random_grid(2**20 // 100 * 2 + 7, 100, bits, seed=bits)
    assert torch.equal(pack_int32(q, bits), pack_to_int32(q, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_zero_point_packing_along_dim0_matches_compressed_tensors(bits):
    zp = random_grid(37, 3, bits, seed=bits)  # [out, groups]: packed along the output dim
    ours = pack_int32(zp.T.contiguous(), bits).T
    assert torch.equal(ours, pack_to_int32(zp, bits, packed_dim=0))
    assert torch.equal(unpack_int32(ours.T.contiguous(), bits, 37).T, zp)


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_matches_bit_loop_reference(bits):
    q = random_grid(3, 45, bits, seed=7)
    assert torch.equal(pack_int32(q, bits), pack_reference(q, bits))


def test_hand_computed_examples():
    # 4 bits: stored values 0..7 then 15, nibble j at bits 4j..4j+3 -> 0x76543210; then 0xF in word 1.
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1, 7]], dtype=torch.int8)
    assert pack_int32(q, 4).tolist() == [[0x76543210, 0xF]]
    # 3 bits, 11 values = 33 bits: element 10 (stored 7 = 0b111) straddles bits 30, 31 | 32.
    q = torch.full((1, 11), -4, dtype=torch.int8)
    q[0, 10] = 3
    assert pack_int32(q, 3).tolist() == [[-(2**30), 1]]  # 0xC0000000 as int32, then bit 0
    # 8 bits: plain bytes, little-endian; stored 0x80 in the top byte sets the sign bit.
    q = torch.tensor([[1, 2, 3, 0]], dtype=torch.int8)
    assert pack_int32(q, 8).tolist() == [[0x80838281 - 2**32]]


def test_refuses_bad_input():
    with pytest.raises(WeightkitError, match="outside the 4-bit grid"):
        pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(WeightkitError, match="int8"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(WeightkitError, match="words"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 8)
    with pytest.raises(WeightkitError, match="bits"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int8), 9)


# -- byte streams of 1 to 16 bits (pack_bits) -----------------------------------------------------------


def stream_reference(values: list[int], bits: int) -> list[int]:
    """Bit-by-bit loop: bit b of value j is stream bit j*bits + b, bit s % 8 of byte s // 8."""
    out = [0] * -(-len(values) * bits // 8)
    for j, value in enumerate(values):
        for b in range(bits):
            pos = j * bits + b
            out[pos // 8] |= ((value >> b) & 1) << (pos % 8)
    return out


def known_patterns(bits: int) -> list[int]:
    """All ones, all zeros, alternating bits both ways, the top bit alone, 1, and a count that is not a
    multiple of 8 (so values straddle bytes and the last byte is padded)."""
    top = (1 << bits) - 1
    alternating = int("10" * 8, 2) & top
    return [top, 0, alternating, top ^ alternating, 1 << (bits - 1), 1, top, 0, alternating, 1, top]


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_known_patterns_match_the_bit_loop_and_round_trip(bits):
    values = known_patterns(bits)
    packed = pack_bits(torch.tensor(values, dtype=torch.int32), bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (packed_bytes(len(values), bits),) == (-(-len(values) * bits // 8),)
    assert packed.tolist() == stream_reference(values, bits)
    assert unpack_bits(packed, bits, len(values)).tolist() == values


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_random_rows_round_trip_each_row_its_own_stream(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (3, 37), generator=g, dtype=torch.int64)
    packed = pack_bits(values, bits)
    assert packed.shape == (3, packed_bytes(37, bits))
    for row in range(3):
        assert packed[row].tolist() == stream_reference(values[row].tolist(), bits)
    unpacked = unpack_bits(packed, bits, 37)
    assert unpacked.dtype == torch.int32 and torch.equal(unpacked, values.to(torch.int32))


def test_pack_bits_hand_computed_examples():
    # 16 bits: little-endian bytes of each value in turn.
    assert pack_bits(torch.tensor([0x1234, 0xABCD]), 16).tolist() == [0x34, 0x12, 0xCD, 0xAB]
    # 12 bits: 0xABC then 0x123 -> bits 0-11 and 12-23: 0xBC, 0x3A (0x3 over 0xA), 0x12.
    assert pack_bits(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    # 1 bit: value j is bit j; nine values spill one bit into a second byte.
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 0b1]
    # 3 bits: 7 at value 2 straddles bits 6, 7 | 8.
    assert pack_bits(torch.tensor([0, 0, 7]), 3).tolist() == [0b11000000, 0b1]
    assert pack_bits(torch.zeros(0, dtype=torch.int32), 5).shape == (0,)


def test_pack_bits_refuses_bad_input():
    with pytest.raises(WeightkitError, match=r"outside the unsigned 4-bit range \[0, 15\]"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(WeightkitError, match="outside the unsigned"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(WeightkitError, match="integer tensor"):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(WeightkitError, match="1 to 16 bits"):
        pack_bits(torch.tensor([1]), 17)
    with pytest.raises(WeightkitError, match="1 to 16 bits"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 0, 1)
    with pytest.raises(WeightkitError, match="take 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(WeightkitError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int8), 3, 5)
