"""WeLore: ranks from each spectrum (flatter -> higher), LRCs factored and N-LRCs untouched, the threshold
solved for a target rank reduction against a plain scan, and the refusals."""

import pytest
import torch

from weightkit.compress import WeLoreConfig, compress
from weightkit.compress.lowrank import welore_ranks, welore_threshold
from weightkit.errors import WeightkitError
from weightkit.linalg import welore_rank
from weightkit.quantized.lowrank import LowRankLinear
from weightkit.testing import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spectrum(decay: float, size: int = 64) -> torch.Tensor:
    return decay ** torch.arange(size, dtype=torch.float32)


def test_a_flatter_spectrum_keeps_a_higher_rank():
    spectra = [spectrum(0.5), spectrum(0.9), spectrum(0.99)]
    ranks = welore_ranks(spectra, threshold=0.2, min_ratio=0.0)
    assert ranks[0] < ranks[1] < ranks[2] <= 64
    # Each is the spectrum's own WeLore rank (one threshold for all).
    assert ranks == [welore_rank(s, threshold=0.2).rank for s in spectra]


def test_a_matrix_losing_at_most_min_ratio_of_its_rank_stays_dense():
    steep, flat = spectrum(0.5), spectrum(0.995)  # flat: drops 0 values below 0.2 ... 64 - rank < 32
    verdicts = [welore_rank(s, threshold=0.2) for s in (steep, flat)]
    assert verdicts[0].ratio > 0.5 > verdicts[1].ratio
    assert welore_ranks([steep, flat], threshold=0.2, min_ratio=0.4999) == [verdicts[0].rank, 64]


def reference_threshold(spectra, target, min_ratio):
    """The smallest candidate (a normalised singular value, or 1) whose reduction reaches the target, by a
    plain scan: LRCs lose their values below the threshold, N-LRCs nothing."""
    spectra = [s.double() for s in spectra]
    normalised = [(s - s.min()) / (s.max() - s.min()) for s in spectra]
    candidates = sorted({float(v) for values in normalised for v in values if v > 0} | {1.0})
    full = sum(len(s) for s in spectra)
    for threshold in candidates:
        removed = 0
        for s, values in zip(spectra, normalised, strict=True):
            dropped = int((values < threshold).sum())
            if dropped / len(s) > min_ratio:
                removed += dropped
        if removed / full >= target:
            return threshold
    return None


@pytest.mark.parametrize("target, min_ratio", [(0.1, 0.0), (0.3, 0.0), (0.5, 0.4999), (0.7, 0.4999)])
def test_the_threshold_solved_for_a_rank_reduction_is_the_plain_scans(target, min_ratio):
    g = torch.Generator().manual_seed(int(target * 10))
    spectra = [
        torch.sort(torch.rand(n, generator=g) ** p, descending=True).values
        for n, p in ((16, 1), (24, 3), (32, 6), (20, 0.5))
    ]
    threshold = welore_threshold(spectra, target, min_ratio=min_ratio)
    assert threshold == reference_threshold(spectra, target, min_ratio)
    ranks = welore_ranks(spectra, threshold=threshold, min_ratio=min_ratio)
    full = sum(len(s) for s in spectra)
    assert (full - sum(ranks)) / full >= target


def test_an_unreachable_rank_reduction_is_refused():
    with pytest.raises(WeightkitError, match="rank reduction of 0.99 is out of reach"):
        welore_threshold([spectrum(0.9, 8), torch.ones(8)], 0.99, min_ratio=0.0)


def test_compress_factors_the_lrcs_at_their_rank_and_leaves_the_n_lrcs_alone():
    original = tiny_llama()
    model = compress(tiny_llama(), WeLoreConfig(threshold=0.3, min_ratio=0.3), progress=False)
    kinds = set()
    for name, layer in original.named_modules():
        if not isinstance(layer, torch.nn.Linear) or name == "lm_head":
            continue
        verdict = welore_rank(torch.linalg.svdvals(layer.weight), threshold=0.3)
        result = model.get_submodule(name)
        if verdict.ratio > 0.3:
            assert isinstance(result, LowRankLinear) and result.rank == verdict.rank
        else:
            assert isinstance(result, torch.nn.Linear) and torch.equal(result.weight, layer.weight)
        kinds.add(type(result))
    assert kinds == {LowRankLinear, torch.nn.Linear}  # the test saw both kinds


def test_a_threshold_that_makes_no_lrc_is_refused():
    with pytest.raises(WeightkitError, match="at threshold 0.01 no selected matrix loses more than"):
        compress(tiny_llama(), WeLoreConfig(threshold=0.01), progress=False)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"threshold": 0.2, "rank_reduction": 0.5}, "not both"),
        ({"threshold": 1.5}, r"normalised to \[0, 1\]"),
        ({"rank_reduction": 1.0}, r"in \(0, 1\)"),
        ({"min_ratio": 1.0}, r"in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(WeightkitError, match=message):
        WeLoreConfig(**fields)
