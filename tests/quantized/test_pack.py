"""Tests for weightkit.quantized.pack: compressed-tensors' dense int32 layout."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from weightkit.errors import WeightkitError
from weightkit.quantized.pack import pack_int32, packed_cols, unpack_int32


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
