"""The intrinsic dimension ``d90`` of a task: the fewest trained numbers that reach 90% of the full score.

Papers:

- Li, Farkhoor, Liu, Yosinski, "Measuring the Intrinsic Dimension of Objective Landscapes", arXiv 1804.08838:
  train only ``theta_d`` in ``theta = theta_0 + P theta_d`` (a random ``D x d`` projection) for a range of
  ``d``; ``d_int90`` is the smallest ``d`` whose solution reaches 90% of the performance of training all
  ``D`` parameters (the "baseline"). They train at a sweep of ``d`` values and read the crossing off that
  sweep: :func:`d90_sweep`.
- Aghajanyan, Zettlemoyer, Gupta, "Intrinsic Dimensionality Explains the Effectiveness of Language Model
  Fine-Tuning", arXiv 2012.13255: the same ``d90`` for fine-tuning a pre-trained model (``theta_0`` the
  pre-trained weights), relative to full fine-tuning's score, with the DID and SAID subspaces that
  :mod:`weightkit.adapt.subspace` implements.

This module holds the search only: it is given the full fine-tune's score and a callable ``score_at(d)``
that trains in a ``d``-dimensional subspace and evaluates (``weightkit.cli.inspect_extras`` builds one from
``weightkit.adapt``), so it never trains anything itself.

Two searches:

- :func:`d90_sweep`: every ``d`` of a given list, the papers' procedure; ``d90`` is the smallest listed
  ``d`` whose score reaches the threshold (a noisy curve may dip below it again further up: the first
  crossing counts, as in Li et al.'s definition).
- :func:`d90_bisect`: for when each ``score_at`` is a training run too costly to sweep: double ``d`` from
  ``low`` until the score reaches the threshold (at most ``high``), then bisect (geometrically, as ``d``
  spans decades) between the last ``d`` below it and the first above, to ``tolerance``. It assumes the score
  grows with ``d``; on a noisy curve it returns a ``d`` that reaches the threshold with a smaller evaluated
  ``d`` just below that does not. Not in the papers: a deliberate addition, documented as such.

The threshold is ``reference + fraction * (full_score - reference)``. With the papers' ``reference = 0`` it
is ``0.9 * full_score`` (accuracy, F1). A score that is not a fraction of something (a negative loss, where
90% of ``-2`` would be *above* ``-2``) needs a reference that counts as "nothing learned", e.g. the score
before fine-tuning: the threshold then is 90% of the way from it to the full fine-tune's score (an
extension of the papers' definition to such scores).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from weightkit.errors import WeightkitError

__all__ = ["IntrinsicDimension", "d90_threshold", "d90_sweep", "d90_bisect"]


@dataclass
class IntrinsicDimension:
    """The result of a ``d90`` search.

    Attributes:
        d90: the smallest evaluated ``d`` whose score reaches :attr:`threshold`; ``None`` if none does.
        threshold: the score ``d90`` has to reach.
        full_score: the full fine-tune's score.
        reference: the score counting as nothing learned (0 in the papers).
        fraction: the share of the way from ``reference`` to ``full_score`` (0.9 for ``d90``).
        curve: ``(d, score)`` for every evaluated ``d``, ascending in ``d``.
    """

    d90: int | None
    threshold: float
    full_score: float
    reference: float
    fraction: float
    curve: list[tuple[int, float]]


def d90_threshold(full_score: float, *, fraction: float = 0.9, reference: float = 0.0) -> float:
    """``reference + fraction * (full_score - reference)`` (module docstring).

    Raises:
        WeightkitError: ``fraction`` outside (0, 1], or a full score not above the reference (there is then
            nothing to reach a fraction of).
    """
    if not 0 < fraction <= 1:
        raise WeightkitError(f"fraction must be in (0, 1], got {fraction}")
    if not (math.isfinite(full_score) and math.isfinite(reference)):
        raise WeightkitError(f"the full score ({full_score}) and the reference ({reference}) must be finite")
    if full_score <= reference:
        raise WeightkitError(
            f"the full fine-tune scores {full_score:g}, not above the reference {reference:g}: there is no "
            "gain to reach a fraction of (for a score such as a negative loss, give the score before "
            "fine-tuning as the reference)"
        )
    return reference + fraction * (full_score - reference)


def _score(score_at: Callable[[int], float], d: int) -> float:
    score = float(score_at(d))
    if not math.isfinite(score):
        raise WeightkitError(f"the score at d={d} is {score}")
    return score


def _check_dim(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WeightkitError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def d90_sweep(
    score_at: Callable[[int], float],
    full_score: float,
    dims: Sequence[int],
    *,
    fraction: float = 0.9,
    reference: float = 0.0,
) -> IntrinsicDimension:
    """Evaluate ``score_at`` at every ``d`` of ``dims`` (in ascending order) and return the smallest that
    reaches the threshold, with the whole curve.

    Raises:
        WeightkitError: an empty ``dims``, a ``d`` that is not a positive integer or is listed twice, a
            non-finite score, or a threshold :func:`d90_threshold` refuses.
    """
    threshold = d90_threshold(full_score, fraction=fraction, reference=reference)
    if not dims:
        raise WeightkitError("no dimensions to try")
    ordered = sorted(_check_dim(d, "each dimension") for d in dims)
    if len(set(ordered)) != len(ordered):
        raise WeightkitError(f"a dimension is listed twice: {list(dims)}")
    curve = [(d, _score(score_at, d)) for d in ordered]
    d90 = next((d for d, score in curve if score >= threshold), None)
    return IntrinsicDimension(d90, threshold, full_score, reference, fraction, curve)


def d90_bisect(
    score_at: Callable[[int], float],
    full_score: float,
    *,
    low: int,
    high: int,
    tolerance: float = 0.0,
    fraction: float = 0.9,
    reference: float = 0.0,
) -> IntrinsicDimension:
    """Doubling from ``low`` then geometric bisection (module docstring), each ``d`` evaluated at most once.

    Stops when the bracket ``(below, above]`` is down to ``above <= below * (1 + tolerance)`` or to
    neighbouring integers (``tolerance = 0``: the exact smallest integer, on a monotone score).

    Raises:
        WeightkitError: ``low``/``high`` not positive integers with ``low <= high``, a negative tolerance, a
            non-finite score, or a threshold :func:`d90_threshold` refuses.
    """
    threshold = d90_threshold(full_score, fraction=fraction, reference=reference)
    low, high = _check_dim(low, "low"), _check_dim(high, "high")
    if low > high:
        raise WeightkitError(f"low ({low}) must not exceed high ({high})")
    if not tolerance >= 0:
        raise WeightkitError(f"tolerance must be >= 0, got {tolerance}")
    scores: dict[int, float] = {}

    def reaches(d: int) -> bool:
        if d not in scores:
            scores[d] = _score(score_at, d)
        return scores[d] >= threshold

    below, above = None, low
    while not reaches(above):
        if above == high:
            return IntrinsicDimension(
                None, threshold, full_score, reference, fraction, sorted(scores.items())
            )
        below, above = above, min(2 * above, high)
    if below is not None:
        while above - below > 1 and above > below * (1 + tolerance):
            middle = min(max(round(math.sqrt(below * above)), below + 1), above - 1)
            if reaches(middle):
                above = middle
            else:
                below = middle
    return IntrinsicDimension(above, threshold, full_score, reference, fraction, sorted(scores.items()))
