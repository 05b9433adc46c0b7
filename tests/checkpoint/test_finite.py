import math

import pytest
import torch

import weightkit.errors
from weightkit.errors import WeightkitError, require_finite


def _reference_counts(t: torch.Tensor) -> tuple[int, int]:
    values = t.double().flatten().tolist()
    return sum(math.isnan(v) for v in values), sum(math.isinf(v) for v in values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_counts_nan_and_inf(dtype):
    t = torch.randn(6, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    t[0, 0] = float("nan")
    t[2, 3] = float("inf")
    t[5, 6] = float("-inf")
    t[4, 1] = float("nan")
    nan, inf = _reference_counts(t)
    assert (nan, inf) == (2, 2)
    with pytest.raises(WeightkitError, match=r"^tensor model\.w contains 4 NaN/Inf values \(2 NaN, 2 Inf\)$"):
        require_finite(t, "model.w")


def test_finite_and_integer_tensors_pass():
    require_finite(torch.randn(5, 5), "ok")
    require_finite(torch.tensor([], dtype=torch.float32), "empty")
    require_finite(torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32), "ints")
    require_finite(torch.tensor(3.0).expand(4, 4), "broadcast view")


def test_checks_every_chunk(monkeypatch):
    monkeypatch.setattr(weightkit.errors, "_FINITE_CHUNK", 7)
    t = torch.zeros(10, 5).t()  # non-contiguous, 50 elements over 8 chunks
    t[4, 9] = float("inf")  # in the last chunk
    with pytest.raises(WeightkitError, match="contains 1 NaN/Inf values"):
        require_finite(t, "w")


def test_finite_values_whose_sum_overflows_pass():
    # The sum of these overflows float32 to inf; no entry is Inf, so the exact count must clear them.
    require_finite(torch.full((4,), 3e38), "big")
    with pytest.raises(WeightkitError, match="1 NaN/Inf values \\(0 NaN, 1 Inf\\)"):
        require_finite(torch.tensor([3e38, 3e38, float("inf")]), "big")
