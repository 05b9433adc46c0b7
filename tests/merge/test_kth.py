"""Tests for weightkit.merge.kth: radix selection against Python's sorted()."""

import pytest
import torch

from weightkit.merge.kth import StreamedKthSmallest, kth_smallest


def values(seed, n=5000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).abs()
    x[: n // 5] = 0.0  # many zeros (a frozen embedding's delta) ...
    x[n // 5 : n // 3] = x[n // 5]  # ... and a run of equal values
    x[-3:] = torch.tensor([1e-40, 3e38, float(torch.finfo(torch.float32).tiny)])  # subnormal, huge, tiny
    return x[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("position", [0, 1, 999, 1000, 1666, 1667, 2500, 4997, 4999])
def test_kth_smallest_is_sorted_at_the_position(position):
    x = values(0)
    expected = sorted(x.tolist())[position]
    assert float(kth_smallest(x.reshape(50, 100), position)) == expected


def test_other_dtypes_fall_back_to_kthvalue():
    x = values(1).double()
    assert float(kth_smallest(x, 321)) == sorted(x.tolist())[321]


@pytest.mark.parametrize("position", [0, 777, 4000, 14999])
def test_a_stream_gives_the_value_of_all_its_tensors_together(position):
    parts = [values(seed, n) for seed, n in ((2, 5000), (3, 7000), (4, 3000))]
    select = StreamedKthSmallest(position)
    while not select.done:
        for part in parts:
            select.update(part)
        select.finish_pass()
    assert float(select.value) == sorted(torch.cat(parts).tolist())[position]
