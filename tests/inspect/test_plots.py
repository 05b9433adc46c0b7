"""The report's plots: the power-law overlay is the right density, the PNGs are deterministic, decode to
the stated size and show what they claim (the fit line), and mismatched inputs are refused."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from weightkit.errors import WeightkitError
from weightkit.inspect.plots import (
    comparison_bars_png,
    heatmap_png,
    metric_bars_png,
    metric_panels_png,
    powerlaw_density,
    spectrum_png,
)

_FIT_RED = np.array([0xC4, 0x4E, 0x52])


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _planted(alpha: float, xmin: float, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Half the values uniform below ``xmin`` (a bulk), half Pareto(alpha) from ``xmin`` on."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n // 2, generator=g, dtype=torch.float64) * xmin * 0.99
    tail = xmin * torch.rand(n // 2, generator=g, dtype=torch.float64) ** (-1 / (alpha - 1))
    return torch.cat([bulk, tail])


def test_the_power_law_overlay_matches_the_histogram_density_of_all_eigenvalues():
    values = _planted(alpha=2.5, xmin=1.0)
    edges = torch.logspace(0, 1.5, 16, dtype=torch.float64)  # bins over the tail, xmin to 10^1.5
    counts = torch.histogram(values, bins=edges).hist
    empirical = counts / (values.numel() * (edges[1:] - edges[:-1]))
    centers = (edges[:-1] * edges[1:]).sqrt()
    line = powerlaw_density(values, 2.5, 1.0, centers)
    # Half the eigenvalues are in the tail: the line is the tail density times 1/2, not the tail density.
    assert powerlaw_density(values, 2.5, 1.0, torch.tensor([1.0])).item() == pytest.approx(0.75, rel=0.01)
    torch.testing.assert_close(empirical, line, rtol=0.1, atol=0)


def test_powerlaw_density_refuses_an_unnormalisable_fit():
    with pytest.raises(WeightkitError, match="alpha > 1"):
        powerlaw_density(torch.ones(3), 1.0, 1.0, torch.ones(1))


def test_a_spectrum_is_deterministic_and_draws_the_fit_only_when_given():
    eigenvalues = _planted(alpha=3.0, xmin=0.5, n=2000)
    with_fit = spectrum_png(eigenvalues, title="w", alpha=3.0, xmin=0.5)
    assert with_fit == spectrum_png(eigenvalues, title="w", alpha=3.0, xmin=0.5)
    without = spectrum_png(eigenvalues, title="w")
    red = [np.all(_image(png) == _FIT_RED, axis=-1).sum() for png in (with_fit, without)]
    assert red[0] > 100 and red[1] == 0
    assert _image(with_fit).shape == (400, 600, 3)


def test_a_spectrum_refuses_half_a_fit_and_too_few_positive_eigenvalues():
    with pytest.raises(WeightkitError, match="only one"):
        spectrum_png(torch.rand(10), title="w", alpha=2.0)
    with pytest.raises(WeightkitError, match="fewer than two positive"):
        spectrum_png(torch.tensor([0.0, 0.0, 3.0]), title="w")


def test_metric_bars_keep_checkpoint_positions_and_refuse_mismatches():
    png = metric_bars_png(["a", "b", "c"], [1.0, None, 3.0], metric="stable_rank")
    assert png == metric_bars_png(["a", "b", "c"], [1.0, None, 3.0], metric="stable_rank")
    assert png != metric_bars_png(["a", "b", "c"], [1.0, 3.0, None], metric="stable_rank")
    with pytest.raises(WeightkitError, match="3 names but 2 values"):
        metric_bars_png(["a", "b", "c"], [1.0, 2.0], metric="alpha")
    with pytest.raises(WeightkitError, match="no layer has a value"):
        metric_bars_png(["a"], [None], metric="alpha")


def test_metric_panels_stack_one_panel_per_metric_and_refuse_mismatches():
    series = {"alpha": [2.0, None, 4.0], "stable_rank": [1.0, 2.0, 3.0]}
    png = metric_panels_png(["a", "b", "c"], series)
    assert png == metric_panels_png(["a", "b", "c"], series)  # deterministic bytes
    assert png != metric_panels_png(["a", "b", "c"], {**series, "alpha": [2.0, 4.0, None]})  # slots kept
    one = Image.open(io.BytesIO(metric_panels_png(["a", "b", "c"], {"alpha": series["alpha"]})))
    assert Image.open(io.BytesIO(png)).height > one.height  # a panel more, a taller figure
    with pytest.raises(WeightkitError, match="3 names but 2 values"):
        metric_panels_png(["a", "b", "c"], {"alpha": [1.0, 2.0]})
    with pytest.raises(WeightkitError, match="no layer has a value"):
        metric_panels_png(["a"], {"alpha": [None]})
    with pytest.raises(WeightkitError, match="at least one metric"):
        metric_panels_png(["a"], {})


def test_heatmap_and_comparison_bars_refuse_labels_that_do_not_fit_the_data():
    png = heatmap_png(
        torch.eye(3), row_labels=list("abc"), col_labels=list("abc"), title="t", value_label="v"
    )
    assert _image(png).shape[2] == 3
    with pytest.raises(WeightkitError, match="3 x 2 heatmap"):
        heatmap_png(torch.eye(3), row_labels=list("abc"), col_labels=list("ab"), title="t", value_label="v")
    bars = comparison_bars_png(["l0", "l1"], {"base": [1, 2], "tuned": [2, 1]}, title="t", ylabel="y")
    assert bars == comparison_bars_png(["l0", "l1"], {"base": [1, 2], "tuned": [2, 1]}, title="t", ylabel="y")
    with pytest.raises(WeightkitError, match="'tuned' has 1 values for 2 labels"):
        comparison_bars_png(["l0", "l1"], {"base": [1, 2], "tuned": [2]}, title="t", ylabel="y")
