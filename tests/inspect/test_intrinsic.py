"""The d90 searches on synthetic score curves whose crossing is known."""

import math
import random

import pytest

from weightkit.errors import WeightkitError
from weightkit.inspect.intrinsic import d90_bisect, d90_sweep, d90_threshold

# A saturating score: 1 - exp(-d / 100) reaches 0.9 of the full score 1.0 at d = 100 ln 10 = 230.26, so the
# smallest integer d reaching it is 231.
CROSSING = 231


def saturating(d: int) -> float:
    return 1 - math.exp(-d / 100)


class Counting:
    """A score function that records the dimensions it was asked for."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, d: int) -> float:
        self.calls.append(d)
        return self.fn(d)


def test_the_sweep_returns_the_first_listed_dimension_over_the_threshold_and_the_curve():
    dims = [512, 1, 4, 16, 64, 128, 256, 1024]
    result = d90_sweep(saturating, 1.0, dims)
    assert result.d90 == 256 and result.threshold == pytest.approx(0.9)
    assert [d for d, _ in result.curve] == sorted(dims)
    assert all(score == saturating(d) for d, score in result.curve)


def test_bisection_finds_the_exact_smallest_integer_with_few_evaluations():
    score = Counting(saturating)
    result = d90_bisect(score, 1.0, low=1, high=100_000)
    assert result.d90 == CROSSING
    assert saturating(CROSSING) >= 0.9 > saturating(CROSSING - 1)
    assert len(score.calls) == len(set(score.calls)) <= 2 * math.ceil(math.log2(100_000))
    assert result.curve == sorted((d, saturating(d)) for d in score.calls)


def test_bisection_stops_at_the_relative_tolerance():
    result = d90_bisect(saturating, 1.0, low=1, high=100_000, tolerance=0.25)
    below = max(d for d, score in result.curve if score < 0.9)
    assert result.d90 >= CROSSING and result.d90 <= below * 1.25


def test_on_a_noisy_curve_both_searches_land_in_the_noise_band_around_the_crossing():
    # +-0.02 of noise moves the crossing anywhere the clean score is within 0.02 of 0.9: d in [212, 252].
    rng = random.Random(0)
    noise = {}

    def noisy(d: int) -> float:
        noise.setdefault(d, rng.uniform(-0.02, 0.02))
        return saturating(d) + noise[d]

    dims = list(range(20, 1001, 20))
    swept = d90_sweep(noisy, 1.0, dims)
    assert swept.d90 == next(d for d in dims if noisy(d) >= 0.9)  # the first crossing, a plain loop
    assert 200 <= swept.d90 <= 260
    bisected = d90_bisect(noisy, 1.0, low=8, high=4096)
    assert 200 <= bisected.d90 <= 260
    assert noisy(bisected.d90) >= 0.9 > noisy(bisected.d90 - 1)


def test_a_score_that_never_gets_there_gives_no_d90_but_the_curve():
    assert d90_sweep(lambda d: 0.5, 1.0, [1, 10, 100]).d90 is None
    capped = d90_bisect(lambda d: 0.5, 1.0, low=1, high=100)
    assert capped.d90 is None and [d for d, _ in capped.curve] == [1, 2, 4, 8, 16, 32, 64, 100]


def test_a_low_already_over_the_threshold_is_the_answer():
    result = d90_bisect(saturating, 1.0, low=500, high=1000)
    assert result.d90 == 500 and len(result.curve) == 1


def test_a_reference_measures_the_fraction_of_the_gain():
    # Negative losses: -3 before fine-tuning, -1 after full fine-tuning; 90% of the gain is -1.2.
    assert d90_threshold(-1.0, reference=-3.0) == pytest.approx(-1.2)
    result = d90_sweep(lambda d: -1 - 2 * math.exp(-d / 100), -1.0, [100, 200, 300], reference=-3.0)
    assert result.d90 == 300  # -1 - 2 e^-3 = -1.0996 >= -1.2 > -1 - 2 e^-2 = -1.27


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: d90_threshold(-2.0), "not above the reference"),
        (lambda: d90_threshold(1.0, fraction=1.5), "fraction"),
        (lambda: d90_sweep(saturating, 1.0, []), "no dimensions"),
        (lambda: d90_sweep(saturating, 1.0, [4, 4]), "twice"),
        (lambda: d90_sweep(saturating, 1.0, [0, 4]), "integer >= 1"),
        (lambda: d90_sweep(lambda d: math.nan, 1.0, [4]), "d=4 is nan"),
        (lambda: d90_bisect(saturating, 1.0, low=10, high=5), "must not exceed"),
    ],
)
def test_bad_searches_are_refused_by_name(call, message):
    with pytest.raises(WeightkitError, match=message):
        call()
