"""The inspect report's plots as PNG bytes (matplotlib, Agg backend): issue 15, item 7.

Every function takes plain numbers (tensors or sequences) and returns the PNG file's bytes, so the
report embeds them in its HTML and writes them beside it, and tests read them back. Figures are drawn
with a fixed size, resolution and style and without the PNG's software/date metadata, so the same input
gives the same bytes.

- :func:`spectrum_png`: a matrix's empirical spectral density, the eigenvalues ``lambda = sigma^2`` of
  ``W^T W`` on log-log axes, with the fitted power law from ``xmin`` on when the fit is given.
- :func:`metric_bars_png`: one metric per layer, layers in checkpoint order.
- :func:`heatmap_png`: any square or rectangular matrix with row/column labels (layer similarity).
- :func:`comparison_bars_png`: grouped bars, one group per label, one bar per series (checkpoint comparison).
- :func:`line_plot_png`: curves ``y(x)`` on one chart, optionally log axes and a labelled horizontal line
  (a Hessian's eigenvalue density, the loss along a path between checkpoints, a score against ``d``).
"""

import io
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from weightkit.errors import WeightkitError

__all__ = [
    "powerlaw_density",
    "spectrum_png",
    "metric_bars_png",
    "metric_panels_png",
    "heatmap_png",
    "comparison_bars_png",
    "line_plot_png",
]

_DPI = 100
# Above this many bars the x labels (tensor names) would overlap: label every k-th bar only.
_MAX_LABELS = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; also what makes the output independent of the machine's backend
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    # No "Software" (matplotlib version) or date chunks: the bytes depend on the data alone.
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def powerlaw_density(eigenvalues: Tensor, alpha: float, xmin: float, points: Tensor) -> Tensor:
    """The fitted power law as a density of *all* the eigenvalues, at ``points`` (each ``>= xmin``).

    The fit ``p(x) = (alpha - 1) / xmin * (x / xmin)^-alpha`` is a density of the tail ``x >= xmin``
    alone; the histogram it is drawn over is a density of every eigenvalue, so the line is scaled by the
    tail's share of the eigenvalues. Drawn this way it lies on the histogram where the fit is good.

    Raises:
        WeightkitError: ``alpha <= 1`` (no normalisable power law) or ``xmin <= 0``.
    """
    if not alpha > 1 or not xmin > 0:
        raise WeightkitError(f"a power-law fit needs alpha > 1 and xmin > 0; got alpha={alpha}, xmin={xmin}")
    tail_share = (eigenvalues >= xmin).double().mean()
    return tail_share * (alpha - 1) / xmin * (points.double() / xmin) ** -alpha


def spectrum_png(
    eigenvalues: Tensor, *, title: str, alpha: float | None = None, xmin: float | None = None
) -> bytes:
    """A log-log histogram (density, log-spaced bins) of the positive ``eigenvalues``, and when
    ``alpha`` and ``xmin`` are given the fitted power law from ``xmin`` on (slope ``-alpha``) and a
    dashed line at ``xmin``.

    Raises:
        WeightkitError: fewer than two positive eigenvalues, or only one of ``alpha``/``xmin`` given.
    """
    if (alpha is None) != (xmin is None):
        raise WeightkitError("spectrum_png draws a power-law fit from both alpha and xmin; got only one")
    values = eigenvalues.detach().double().cpu().flatten()
    positive = values[values > 0]  # zero eigenvalues (rank deficiency) have no place on a log axis
    if positive.numel() < 2:
        raise WeightkitError(f"{title}: fewer than two positive eigenvalues, no spectrum to draw")
    low, high = float(positive.min()), float(positive.max())
    if low == high:
        low, high = low / 2, high * 2  # one repeated value: one visible bar
    bins = torch.logspace(math.log10(low), math.log10(high), 51, dtype=torch.float64)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(positive.numpy(), bins=bins.numpy(), density=True, color="#4c72b0", alpha=0.75, label="ESD")
    if alpha is not None and xmin is not None:
        line_x = torch.logspace(math.log10(max(xmin, low)), math.log10(high), 100, dtype=torch.float64)
        line_y = powerlaw_density(positive, alpha, xmin, line_x)
        ax.plot(line_x.numpy(), line_y.numpy(), color="#c44e52", lw=2, label=f"power law, alpha={alpha:.3g}")
        ax.axvline(xmin, color="#555555", ls="--", lw=1, label=f"xmin={xmin:.3g}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue of WᵀW (σ²)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    # Fixed margins: tight_layout measures every tick label of the log axes, which took most of the time.
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.91)
    return _png(fig)


def _label_every(n: int) -> int:
    return max(1, math.ceil(n / _MAX_LABELS))


def metric_bars_png(names: Sequence[str], values: Sequence[float | None], *, metric: str) -> bytes:
    """One bar per layer (``names`` in checkpoint order) of ``metric``; ``None`` (a skipped tensor, or a
    metric that tensor has not) leaves an empty slot so the positions stay those of the checkpoint.

    Raises:
        WeightkitError: ``names`` and ``values`` differ in length, or no value is given.
    """
    if len(names) != len(values):
        raise WeightkitError(f"{metric}: {len(names)} names but {len(values)} values")
    if all(v is None for v in values):
        raise WeightkitError(f"{metric}: no layer has a value to plot")
    heights = [math.nan if v is None else float(v) for v in values]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.25 * len(names), 16.0)), 4.5))
    ax.bar(range(len(names)), heights, color="#4c72b0")
    step = _label_every(len(names))
    ax.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)])
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per layer", fontsize=10)
    # Fixed margins, room below for the rotated names: tight_layout measured every label, a third of the time.
    longest = max(len(name) for name in names[::step])
    fig.subplots_adjust(left=0.08, right=0.99, top=0.93, bottom=min(0.6, 0.1 + 0.0095 * longest))
    return _png(fig)


def metric_panels_png(names: Sequence[str], series: dict[str, Sequence[float | None]]) -> bytes:
    """One panel of bars per metric of ``series`` (metric -> one value per name), stacked on one shared axis
    of layers (``names`` in checkpoint order; the names are written once, under the last panel). ``None``
    leaves an empty slot. One figure instead of one per metric: each figure's tick labels cost as much to
    draw as its bars.

    Raises:
        WeightkitError: no metric, a metric whose values differ in length from ``names``, or a metric
            with no value at all.
    """
    if not series:
        raise WeightkitError("metric_panels_png needs at least one metric")
    for metric, values in series.items():
        if len(values) != len(names):
            raise WeightkitError(f"{metric}: {len(names)} names but {len(values)} values")
        if all(v is None for v in values):
            raise WeightkitError(f"{metric}: no layer has a value to plot")
    plt = _pyplot()
    step = _label_every(len(names))
    longest = max(len(name) for name in names[::step])
    label_inches = 0.3 + 0.05 * longest  # room for the rotated names (fontsize 6)
    panel_inches = 1.5
    height = panel_inches * len(series) + label_inches + 0.4
    fig, axes = plt.subplots(
        len(series), 1, figsize=(max(6.0, min(0.25 * len(names), 16.0)), height), sharex=True, squeeze=False
    )
    for ax, (metric, values) in zip(axes[:, 0], series.items(), strict=True):
        ax.bar(range(len(names)), [math.nan if v is None else float(v) for v in values], color="#4c72b0")
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    last = axes[-1, 0]
    last.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)])
    last.tick_params(axis="x", labelrotation=90, labelsize=6)
    top, bottom = 1 - 0.3 / height, label_inches / height
    fig.subplots_adjust(left=0.08, right=0.99, top=top, bottom=bottom, hspace=0.12)
    return _png(fig)


def heatmap_png(
    matrix: Tensor, *, row_labels: Sequence[str], col_labels: Sequence[str], title: str, value_label: str
) -> bytes:
    """A heatmap of a 2-D ``matrix`` (row ``i`` labelled ``row_labels[i]``), with a colour bar named
    ``value_label``.

    Raises:
        WeightkitError: ``matrix`` is not 2-D or the labels do not match its shape.
    """
    if matrix.dim() != 2 or matrix.shape != (len(row_labels), len(col_labels)):
        raise WeightkitError(
            f"{title}: a {len(row_labels)} x {len(col_labels)} heatmap needs a matrix of that shape, "
            f"got {tuple(matrix.shape)}"
        )
    plt = _pyplot()
    side = max(4.0, min(0.3 * max(matrix.shape), 14.0))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(matrix.detach().double().cpu().numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=value_label)
    rows, cols = _label_every(len(row_labels)), _label_every(len(col_labels))
    ax.set_yticks(range(0, len(row_labels), rows), [row_labels[i] for i in range(0, len(row_labels), rows)])
    ax.set_xticks(range(0, len(col_labels), cols), [col_labels[i] for i in range(0, len(col_labels), cols)])
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def comparison_bars_png(
    labels: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, ylabel: str
) -> bytes:
    """Grouped bars: for each of ``labels`` (layers, say) one bar per series (checkpoints, say), series
    in the mapping's order, with a legend.

    Raises:
        WeightkitError: no series, or a series whose length is not ``len(labels)``.
    """
    if not series:
        raise WeightkitError(f"{title}: no series to compare")
    for name, values in series.items():
        if len(values) != len(labels):
            raise WeightkitError(
                f"{title}: series {name!r} has {len(values)} values for {len(labels)} labels"
            )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, min(0.3 * len(labels) * len(series), 16.0)), 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = [j - 0.4 + width * (i + 0.5) for j in range(len(labels))]
        ax.bar(positions, [float(v) for v in values], width=width, label=name)
    step = _label_every(len(labels))
    ax.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)])
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# On a log y axis, values below the largest one times this are not drawn: a density estimated with Gaussian
# kernels falls to 1e-300 between its peaks, which would stretch the axis over hundreds of decades.
_LOG_Y_RANGE = 1e-8


def line_plot_png(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    log_y: bool = False,
    hline: tuple[float, str] | None = None,
) -> bytes:
    """One line (with point markers) per entry of ``series`` (label -> ``(xs, ys)``), in the mapping's
    order, with a legend; ``hline`` ``(y, label)`` adds a dashed horizontal line (a threshold, say).

    ``log_x``/``log_y`` put that axis on a log scale, where non-positive values are not drawn; on a log y
    axis the range also stops eight decades below the largest value.

    Raises:
        WeightkitError: no series, a series whose ``xs`` and ``ys`` differ in length, or one with no point
            that can be drawn.
    """
    if not series:
        raise WeightkitError(f"{title}: no curve to draw")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    top = -math.inf
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise WeightkitError(f"{title}: curve {name!r} has {len(xs)} x values but {len(ys)} y values")
        points = [
            (float(x), float(y))
            for x, y in zip(xs, ys, strict=True)
            if math.isfinite(float(x)) and math.isfinite(float(y)) and not (log_x and x <= 0)
            and not (log_y and y <= 0)
        ]  # fmt: skip
        if not points:
            raise WeightkitError(f"{title}: curve {name!r} has no point to draw")
        top = max(top, *(y for _, y in points))
        x_values, y_values = zip(*points, strict=True)
        # Markers only where the points are few enough to be read one by one (a sweep, not a density).
        ax.plot(x_values, y_values, lw=1.5, marker="o" if len(points) <= 40 else None, ms=4, label=name)
    if hline is not None:
        ax.axhline(hline[0], color="#555555", ls="--", lw=1, label=hline[1])
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log", nonpositive="mask")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], top * _LOG_Y_RANGE))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
