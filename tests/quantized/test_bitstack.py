"""BitStackLinear, the universal block order and the "bitstack" tensors, against plain references."""

import pytest
import torch
import torch.nn.functional as F

from weightkit.errors import WeightkitError
from weightkit.quantized.bitstack import (
    BitStackLinear,
    BitStackWeight,
    bitstack_tensors,
    bitstack_weight_from_stored,
    block_bytes,
    blocks_within,
    universal_order,
    unpack_signs,
)
from weightkit.quantized.pack import pack_bits, unpack_bits


def random_stack(blocks: int, out_features: int = 6, in_features: int = 10, rank: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    positive = torch.rand(blocks, out_features, in_features, generator=generator) > 0.5
    u = torch.randn(blocks, out_features, rank, generator=generator).half()
    v = torch.randn(blocks, in_features, rank, generator=generator).half()
    scores = tuple(float(s) for s in torch.rand(blocks, generator=generator))
    stack = BitStackWeight(BitStackWeight.pack_signs(positive), u, v, (out_features, in_features), scores)
    return stack, positive


def test_dense_weight_is_the_sum_of_the_blocks_and_forward_uses_it():
    stack, positive = random_stack(3)
    expected = torch.zeros(6, 10)
    for b in range(3):  # the plain sum, block by block
        sign = positive[b].float() * 2 - 1
        expected += sign * (stack.u[b].float() @ stack.v[b].float().T)
    bias = torch.randn(6)
    layer = BitStackLinear(stack, bias)
    assert torch.allclose(layer.dense_weight(), expected, atol=1e-6)
    x = torch.randn(4, 10)
    assert torch.allclose(layer(x), F.linear(x, expected, bias), atol=1e-5)
    assert "3 blocks of rank 2" in repr(layer)


def test_a_layer_with_no_blocks_is_a_zero_weight_plus_its_bias():
    stack, _ = random_stack(2)
    bias = torch.randn(6)
    layer = BitStackLinear(stack.truncated(0), bias)
    assert torch.equal(layer.dense_weight(), torch.zeros(6, 10))
    assert torch.equal(layer(torch.randn(3, 10)), bias.expand(3, 6))


def test_block_bytes_counts_one_bit_per_weight_and_float16_vectors():
    assert block_bytes((6, 10), 2) == 8 + (6 + 10) * 2 * 2  # 60 bits -> 8 bytes
    stack, _ = random_stack(1)
    assert block_bytes((6, 10), 2) == sum(
        t.numel() * t.element_size() for t in (stack.signs, stack.u, stack.v)
    )


def test_universal_order_goes_level_by_level_by_importance():
    scores = {"a": [0.5, 0.01, 0.3], "b": [0.2, 0.4], "c": [0.6, 0.05, 0.001, 0.9]}
    # A plain reference: level by level, highest score first.
    expected = []
    for level in range(4):
        present = sorted((-s[level], name) for name, s in scores.items() if len(s) > level)
        expected += [name for _, name in present]
    assert universal_order(scores) == expected == ["c", "a", "b", "b", "c", "a", "a", "c", "c"]
    assert universal_order({"y": [0.1], "x": [0.1]}) == ["x", "y"]  # ties by name


def test_blocks_within_keeps_the_longest_prefix_that_fits():
    order = ["c", "a", "b", "b", "c", "a"]
    sizes = {"a": 10, "b": 20, "c": 5, "d": 7}
    assert blocks_within(order, sizes, 34) == {"a": 1, "b": 0, "c": 1, "d": 0}  # 5 + 10 + 20 = 35 > 34
    assert blocks_within(order, sizes, 35) == {"a": 1, "b": 1, "c": 1, "d": 0}
    assert blocks_within(order, sizes, 55) == {"a": 1, "b": 2, "c": 1, "d": 0}  # a prefix: no skipping
    assert blocks_within(order, sizes, 4) == {"a": 0, "b": 0, "c": 0, "d": 0}
    assert blocks_within(order, sizes, 10**9) == {"a": 2, "b": 2, "c": 2, "d": 0}


def test_stored_tensors_round_trip_and_a_prefix_loads():
    stack, _ = random_stack(3)
    bias = torch.randn(6)
    stored = bitstack_tensors(stack, bias)
    assert stored["weight"].dim() == 1 and stored["weight"].dtype == torch.uint8
    assert stored["weight_shape"].tolist() == [6, 10] and torch.equal(stored["bias"], bias)
    back = bitstack_weight_from_stored(stored, (6, 10), "layer", 3, stack.scores)
    for got, expected in zip((back.signs, back.u, back.v), (stack.signs, stack.u, stack.v), strict=True):
        assert torch.equal(got, expected)
    two = bitstack_weight_from_stored(stored, (6, 10), "layer", 2, stack.scores[:2])
    assert torch.equal(two.dense(), stack.truncated(2).dense())
    assert two.signs.untyped_storage().nbytes() == two.signs.numel()  # a copy, not a view of all blocks


def test_stored_tensors_are_checked_by_name():
    stack, _ = random_stack(2)
    stored = bitstack_tensors(stack, None)
    with pytest.raises(
        WeightkitError, match=r"layer\.weight_shape is \[6, 10\] but the model's layer is \[10, 6\]"
    ):
        bitstack_weight_from_stored(stored, (10, 6), "layer", 2, stack.scores)
    with pytest.raises(WeightkitError, match=r"layer\.weight is torch\.uint8 of shape \(15,\)"):
        bitstack_weight_from_stored({**stored, "weight": stored["weight"][:-1]}, (6, 10), "layer", 2, ())
    with pytest.raises(WeightkitError, match=r"layer\.weight_stack_v is torch\.float32"):
        bitstack_weight_from_stored({**stored, "weight_stack_v": stack.v.float()}, (6, 10), "layer", 2, ())
    with pytest.raises(WeightkitError, match=r"layer\.weight_stack_u is missing"):
        bitstack_weight_from_stored(
            {k: t for k, t in stored.items() if k != "weight_stack_u"}, (6, 10), "layer", 1, ()
        )
    with pytest.raises(WeightkitError, match="3 blocks asked for, the checkpoint stores 2"):
        bitstack_weight_from_stored(stored, (6, 10), "layer", 3, ())
    with pytest.raises(WeightkitError, match="stored in torch.float16"):
        bitstack_tensors(BitStackWeight(stack.signs, stack.u.float(), stack.v, (6, 10), ()), None)


def test_unpack_signs_is_one_bit_unpack_bits():
    values = (torch.rand(3, 61, generator=torch.Generator().manual_seed(7)) > 0.5).to(torch.uint8)
    packed = pack_bits(values, 1)
    assert torch.equal(unpack_signs(packed, 61), unpack_bits(packed, 1, 61).bool())
    assert torch.equal(unpack_signs(packed, 61), values.bool())
    with pytest.raises(WeightkitError, match="60 signs take 8 bytes per block"):
        unpack_signs(packed[:, :7], 60)
