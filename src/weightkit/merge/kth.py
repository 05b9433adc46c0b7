"""Exact order statistics of non-negative float32 values by radix selection on their bit patterns.

A float32 >= 0 read as an int32 keeps its order (its sign bit is 0), so the value at an ascending
position can be found digit by digit, without sorting: count the high 16 bits of every value (32768
buckets, each 1/128 of a power of two wide), find the bucket that holds the position, then count the
low 16 bits of the values in that bucket. Two counting passes with 32768 + 65536 counters and no value
stored, so the same selection works on one tensor (:func:`kth_smallest`, ~4x faster than
``torch.kthvalue``) and on a stream of tensors too large to hold at once, such as a whole model's task
vector (:class:`StreamedKthSmallest`). TIES's trims and PCB's drop thresholds use it.
"""

import torch
from torch import Tensor

__all__ = ["kth_smallest", "StreamedKthSmallest"]

_HIGH_SHIFT = 16
_HIGH_BINS = 1 << 15  # the sign bit is 0: 15 of the high 16 bits vary
_LOW_BINS = 1 << 16
_LOW_MASK = _LOW_BINS - 1


def _bits(values: Tensor) -> Tensor:
    return values.reshape(-1).view(torch.int32)


def _locate(counts: Tensor, position: int) -> tuple[int, int]:
    """The bin holding 0-based ascending ``position`` given per-bin counts, and the position inside it."""
    cumulative = counts.cumsum(0)
    index = int(torch.searchsorted(cumulative, position, right=True))
    return index, position - int(cumulative[index] - counts[index])


def _high(bits: Tensor) -> Tensor:
    return bits.bitwise_right_shift(_HIGH_SHIFT)


def _low_counts(bits: Tensor, high: Tensor, bucket: int) -> Tensor:
    inside = bits[high == bucket]
    return torch.bincount(inside.bitwise_and_(_LOW_MASK), minlength=_LOW_BINS).cpu()


def _value(bucket: int, low: int) -> Tensor:
    return torch.tensor([(bucket << _HIGH_SHIFT) | low], dtype=torch.int32).view(torch.float32)[0]


def kth_smallest(values: Tensor, position: int) -> Tensor:
    """The value at 0-based ascending ``position`` of a non-negative tensor (``sorted(values)[position]``).

    Args:
        values: any shape; float32 values are selected by radix (other dtypes by ``torch.kthvalue``). Must
            be >= 0 (``+0.0``, not ``-0.0``) and not NaN.
        position: ``0 <= position < numel``.

    Returns:
        A 0-dimensional tensor of ``values``' dtype, on the CPU for float32.
    """
    if values.dtype != torch.float32:
        return torch.kthvalue(values.reshape(-1), position + 1).values
    bits = _bits(values)
    high = _high(bits)
    bucket, rank = _locate(torch.bincount(high, minlength=_HIGH_BINS).cpu(), position)
    low, _ = _locate(_low_counts(bits, high, bucket), rank)
    return _value(bucket, low)


class StreamedKthSmallest:
    """The value at one ascending position among all the values of a stream of tensors, exactly.

    Feed every tensor once per pass with :meth:`update` (any order, the same tensors each pass) and call
    :meth:`finish_pass` after each of the two passes; then :attr:`value` holds the answer. Memory: 65536
    counters, whatever the stream's size.

    Example (the 10th smallest entry of a model-sized stream)::

        select = StreamedKthSmallest(9)
        while not select.done:
            for tensor in stream():
                select.update(tensor)
            select.finish_pass()
        select.value
    """

    def __init__(self, position: int):
        """Select the value at 0-based ascending ``position`` (``0 <= position < total entries``)."""
        self.position = position
        self.value: Tensor | None = None
        self._bucket: int | None = None  # after pass 1: the high 16 bits of the value
        self._rank = 0  # after pass 1: the position inside that bucket
        self._counts = torch.zeros(_HIGH_BINS, dtype=torch.int64)

    @property
    def done(self) -> bool:
        """True once both passes are finished."""
        return self.value is not None

    def update(self, values: Tensor) -> None:
        """Count one tensor of non-negative float32 values for the current pass."""
        bits = _bits(values)
        high = _high(bits)
        if self._bucket is None:
            self._counts += torch.bincount(high, minlength=_HIGH_BINS).cpu()
        else:
            self._counts += _low_counts(bits, high, self._bucket)

    def finish_pass(self) -> None:
        """End the current pass: after the first, the bucket is known; after the second, the value."""
        if self._bucket is None:
            self._bucket, self._rank = _locate(self._counts, self.position)
            self._counts = torch.zeros(_LOW_BINS, dtype=torch.int64)
        else:
            self.value = _value(self._bucket, _locate(self._counts, self._rank)[0])
