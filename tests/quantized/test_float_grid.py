"""Float grids: the formats' value sets enumerated from their bit layouts, rounding, scales."""

import itertools

import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.quantized.float_grid import (
    FloatScheme,
    float_quantize,
    nvfp4_scales,
    power_of_two_scales,
    round_to_format,
)

# (exponent bits, mantissa bits, bias, whether the all-ones exponent holds finite values)
LAYOUTS = {"e4m3": (4, 3, 7, True), "e5m2": (5, 2, 15, False), "e2m1": (2, 1, 1, True)}


def spec_values(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite value of the format from its bit fields, and whether its mantissa is even.

    E4M3 "fn" reserves only S.1111.111 for NaN; E5M2 reserves the whole top exponent (inf/NaN) as IEEE.
    """
    e_bits, m_bits, bias, top_finite = LAYOUTS[fmt]
    values, even = [], []
    for sign, e, m in itertools.product((1, -1), range(2**e_bits), range(2**m_bits)):
        top = e == 2**e_bits - 1
        if top and (not top_finite or (fmt == "e4m3" and m == 2**m_bits - 1)):
            continue
        if e == 0:
            magnitude = m / 2**m_bits * 2.0 ** (1 - bias)
        else:
            magnitude = (1 + m / 2**m_bits) * 2.0 ** (e - bias)
        values.append(sign * magnitude)
        even.append(m % 2 == 0)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(even)


def reference_round(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Nearest value of the set by brute force; on a tie, the one with an even mantissa."""
    values, even = spec_values(fmt)
    top = values.abs().max()
    x = x.double().clamp(-top, top)
    dist = (x[:, None] - values[None, :]).abs()
    nearest = dist == dist.min(dim=1, keepdim=True).values
    preferred = nearest & even[None, :]
    pick = torch.where(preferred.any(dim=1, keepdim=True), preferred, nearest).double().argmax(dim=1)
    return values[pick]


def test_the_enumerated_sets_are_the_spec_ones():
    e2m1, _ = spec_values("e2m1")
    assert sorted(set(e2m1.abs().tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert spec_values("e4m3")[0].max() == 448 and spec_values("e5m2")[0].max() == 57344


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1"])
def test_rounding_is_nearest_with_ties_to_even_and_stays_in_the_set(fmt):
    values, _ = spec_values(fmt)
    positive = values[values > 0].unique()
    midpoints = (positive[1:] + positive[:-1]) / 2
    gen = torch.Generator().manual_seed(0)
    scale = float(positive.max())
    x = torch.cat(
        [
            midpoints,
            -midpoints,
            torch.randn(4000, generator=gen, dtype=torch.float64) * scale / 4,
            torch.rand(2000, generator=gen, dtype=torch.float64) * float(positive.min()) * 8,
            torch.tensor([2 * scale, -3 * scale, 0.0]),  # beyond the range: saturates
        ]
    ).float()
    got = round_to_format(x, fmt).double()
    assert torch.isin(got, values).all()
    assert torch.equal(got, reference_round(x, fmt))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1"])
def test_representable_values_round_trip(fmt):
    values, _ = spec_values(fmt)
    assert torch.equal(round_to_format(values.float(), fmt).double(), values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused_by_name(bad):
    with pytest.raises(WeightkitError, match="layers.0.q_proj.weight"):
        round_to_format(torch.tensor([1.0, bad]), "e4m3", name="layers.0.q_proj.weight")
    with pytest.raises(WeightkitError, match="layers.0.q_proj.weight"):
        float_quantize(torch.tensor([[1.0, bad]]), FloatScheme("e4m3"), name="layers.0.q_proj.weight")


@pytest.mark.parametrize("fmt,mantissa", [("e4m3", 3), ("e5m2", 2)])
@pytest.mark.parametrize("group_size", [None, 8])
def test_fp8_error_is_within_half_a_step_of_each_weight(fmt, mantissa, group_size):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 32)
    q = float_quantize(w, FloatScheme(fmt, group_size))
    cols = 32 // q.scale.shape[1]
    scale = q.scale.repeat_interleave(cols, dim=1)
    # Relative half-step of the mantissa for normal values; half the smallest subnormal step below.
    smallest_step = spec_values(fmt)[0].abs().unique()[1].item()
    bound = torch.maximum(w.abs() * 2.0 ** -(mantissa + 1), scale * smallest_step / 2)
    assert ((q.dequantize() - w).abs() <= bound * (1 + 1e-6)).all()
    # Each group's absmax lands on the format's max: nothing clips.
    groups = q.qweight.float().reshape(16, -1, cols).abs().amax(-1)
    assert torch.equal(groups, torch.full_like(groups, spec_values(fmt)[0].max().item()))


def test_power_of_two_scales_follow_the_paper_and_never_clip():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=gen) * torch.rand(8, 1, generator=gen) * 3
    plain = float_quantize(w, FloatScheme("e4m3", 16)).scale
    m1 = float_quantize(w, FloatScheme("e4m3", 16, "m1")).scale
    m2 = float_quantize(w, FloatScheme("e4m3", 16, "m2")).scale
    assert torch.equal(torch.log2(m1), torch.log2(m1).round())  # powers of two
    assert (m1 >= plain).all() and (m1 < 2 * plain).all()
    ratio = m2 / m2.amax(dim=1, keepdim=True)
    assert torch.equal(torch.log2(ratio), torch.log2(ratio).round())  # row max times powers of two
    assert (m2 >= plain * (1 - 1e-6)).all() and (m2 < 2 * plain).all()
    for method in ("m1", "m2"):
        q = float_quantize(w, FloatScheme("e4m3", 16, method))
        assert q.qweight.float().abs().max() <= 448
        assert ((q.dequantize() - w).abs() <= w.abs().amax() / 8).all()
    with pytest.raises(WeightkitError, match="m1"):
        power_of_two_scales(plain, "m3")


def test_nvfp4_has_fp8_group_scales_a_global_scale_and_e2m1_values():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    q = float_quantize(w, FloatScheme("e2m1", 16))
    scale, global_scale = nvfp4_scales(w)
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (4, 4)
    assert torch.equal(q.scale.float(), scale.float()) and torch.equal(q.global_scale, global_scale)
    torch.testing.assert_close(global_scale, 448 * 6 / w.abs().max().reshape(1), rtol=1e-6, atol=0)
    assert torch.isin(q.qweight.double(), spec_values("e2m1")[0]).all()
    effective = (q.scale.float() / q.global_scale).repeat_interleave(16, dim=1)
    expected = (q.qweight.float() * effective).to(torch.bfloat16)
    assert torch.equal(q.dequantize(), expected)
    # Half an E2M1 step of the largest value in each group, plus the FP8 rounding of the scale.
    assert ((q.dequantize().float() - w).abs() <= effective * 1.0 * 1.07 + 1e-2).all()


@pytest.mark.parametrize(
    "scheme", [FloatScheme("e4m3"), FloatScheme("e5m2", 16, "m1"), FloatScheme("e2m1", 16)]
)
def test_zero_weights_and_zero_groups_stay_zero_and_finite(scheme):
    w = torch.zeros(4, 32)
    w[0, 16:] = torch.linspace(-1, 1, 16)  # one live group beside zero groups
    for weight in (torch.zeros(4, 32), w):
        q = float_quantize(weight, scheme)
        assert torch.isfinite(q.scale.float()).all() and torch.isfinite(q.qweight.float()).all()
        assert torch.equal(q.dequantize().float() == 0, weight == 0)


def test_schemes_refuse_what_they_cannot_store():
    with pytest.raises(WeightkitError, match="group_size 32 is not supported"):
        FloatScheme("e2m1", 32)
    with pytest.raises(WeightkitError, match="power-of-two scales are not supported for FP4"):
        FloatScheme("e2m1", 16, "m1")
    with pytest.raises(WeightkitError, match="power_of_two 'm2' ties a row's group scales"):
        FloatScheme("e4m3", None, "m2")
    with pytest.raises(WeightkitError, match="unknown float format 'e3m4'"):
        FloatScheme("e3m4")
    with pytest.raises(WeightkitError, match="group size 16 does not divide its 40"):
        float_quantize(torch.ones(2, 40), FloatScheme("e4m3", 16), name="x.weight")
