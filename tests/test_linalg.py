"""weightkit.linalg: sign fixing of singular vectors against a plain loop; WeLore's rank reduction ratio and
LRC / N-LRC label against the reference code's rule written out here."""

import numpy as np
import pytest
import torch

from weightkit.errors import WeightkitError
from weightkit.linalg import (
    WELORE_MIN_RATIO,
    WELORE_THRESHOLD,
    largest_entry_signs,
    welore_label,
    welore_rank,
)


def test_signs_of_the_largest_entry_along_either_dimension():
    torch.manual_seed(0)
    m = torch.randn(5, 7)
    m[:, 2] = 0  # a zero vector gets +1
    for dim in (0, 1):
        vectors = m.T if dim == 0 else m  # rows of `vectors` are the vectors
        expected = []
        for v in vectors:
            top = max(range(len(v)), key=lambda i: abs(float(v[i])))
            expected.append(-1.0 if float(v[top]) < 0 else 1.0)
        assert largest_entry_signs(m, dim=dim).tolist() == expected


def test_flipping_makes_the_svd_factors_unique():
    torch.manual_seed(1)
    m = torch.randn(6, 4)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    signs = largest_entry_signs(u, dim=0)
    u1, vh1 = u * signs, vh * signs[:, None]
    u2, vh2 = -u * largest_entry_signs(-u, dim=0), -vh * largest_entry_signs(-u, dim=0)[:, None]
    assert torch.allclose(u1, u2) and torch.allclose(vh1, vh2)
    assert torch.allclose(u1 @ torch.diag(s) @ vh1, m, atol=1e-5)
    assert (u1.abs().argmax(0) == u1.argmax(0)).all()  # the largest entry of every column is positive


def _reference_removed(values: np.ndarray, threshold: float) -> int:
    # VITA-Group/WeLore utils.adaptive_rank_pruning: min-max normalise, count the values under the threshold.
    normalised = (values - min(values)) / (max(values) - min(values))
    return int(sum(normalised < threshold))


def test_the_defaults_are_the_reference_codes():
    assert WELORE_THRESHOLD == 0.175  # rank_thresold_llama7b_dict[50]
    assert WELORE_MIN_RATIO == 0.4999  # --min_ratio of the fine-tuning scripts


@pytest.mark.parametrize("threshold", [0.0225, 0.175, 0.26])
def test_the_ratio_follows_the_reference_rule(threshold):
    values = np.sort(np.random.default_rng(0).gamma(0.5, size=500))[::-1]
    result = welore_rank(torch.from_numpy(values.copy()), threshold=threshold)
    removed = _reference_removed(values, threshold)
    assert result.full_rank == 500
    assert result.rank == 500 - removed
    assert result.ratio == pytest.approx(removed / 500)


def test_a_sharply_decaying_spectrum_is_low_rank_and_a_flat_one_is_not():
    index = torch.arange(1, 257, dtype=torch.float64)
    sharp = welore_rank(index**-2.0)  # heavy-tailed: almost every normalised value is near 0
    flat = welore_rank(
        1 + 0.01 * torch.rand(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    gentle = welore_rank(256.0 - index)  # linear decay: 17.5% of the values are under the threshold
    assert sharp.ratio > 0.9 and welore_label(sharp.ratio) == "LRC"
    assert gentle.rank > sharp.rank and gentle.ratio == pytest.approx(45 / 256)
    assert welore_label(gentle.ratio) == "N-LRC"
    assert flat.rank >= gentle.rank and welore_label(flat.ratio) == "N-LRC"


def test_the_label_threshold_is_strict_as_in_the_reference():
    assert welore_label(0.5) == "LRC" and welore_label(0.4999) == "N-LRC"
    assert welore_label(0.3, min_ratio=0.25) == "LRC"


def test_equal_singular_values_lose_no_rank():
    assert welore_rank(torch.full((8,), 3.0)).ratio == 0


def test_bad_input_is_refused():
    with pytest.raises(WeightkitError, match="1-D"):
        welore_rank(torch.ones(2, 2))
    with pytest.raises(WeightkitError, match=">= 0"):
        welore_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(WeightkitError, match="normalised"):
        welore_rank(torch.ones(3), threshold=1.5)
