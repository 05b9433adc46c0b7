"""The inspect report: stream a checkpoint's tensors through the per-matrix metrics, then write the
result as JSON, CSV, PNG plots and one self-contained HTML page (issue 15, items 7 and 8).

:func:`inspect_checkpoint` reads one tensor at a time with :class:`~weightkit.checkpoint.CheckpointReader`
(no model is built) and gives each 2-D weight to :func:`~weightkit.inspect.metrics.matrix_metrics`; the
columns of the result are whatever that function returns, so a metric added there appears in the JSON,
CSV, DataFrame, HTML and terminal table without a change here. A tensor that is not a matrix (a bias, a
norm's scale, a convolution kernel, a scalar, integer data) or that ``matrix_metrics`` refuses gets a row
with ``skipped`` saying why, never a number.

:func:`write_report` lays the page out as a list of :class:`Section` (a title, a table, figures): the
metric sections of the result first, then any the caller adds (layer similarity, a checkpoint
comparison ...), all rendered the same way. The directory is written beside its target and renamed into
place when complete, as the checkpoint writer does, so a failure never leaves a half-written report.
"""

import base64
import csv
import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader
from weightkit.checkpoint.writer import default_permissions
from weightkit.errors import WeightkitError
from weightkit.inspect.metrics import matrix_metrics
from weightkit.inspect.plots import metric_bars_png, spectrum_png
from weightkit.inspect.spectral import singular_values
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.runtime.device import resolve_device

__all__ = [
    "InspectResult",
    "Figure",
    "Section",
    "inspect_checkpoint",
    "spectrum_choice",
    "metric_sections",
    "check_report_target",
    "write_report",
    "BAR_METRICS",
]

# The columns every row has before its metrics, and the one a skipped row has instead of them.
_ROW_KEYS = ("name", "shape", "dtype")
_SKIPPED = "skipped"
# Metrics that get a per-layer bar plot, in this order, when matrix_metrics returns them.
BAR_METRICS = (
    "alpha",
    "alpha_weighted",
    "stable_rank",
    "effective_rank",
    "rank_90",
    "mp_outliers",
    "welore_ratio",
    "spectral_norm",
)
# Tensors that only exist in quantized checkpoints (compressed-tensors' packed and FP8 layouts, GPTQ and
# AWQ): read as stored they are integer codes and scales, not the weights.
_QUANTIZED_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "qweight", "qzeros")
# Files of a report: a --force overwrite replaces only a directory holding one of them (or nothing).
_REPORT_FILES = ("report.html", "metrics.json")


@dataclass
class InspectResult:
    """What :func:`inspect_checkpoint` found.

    Attributes:
        source: the checkpoint inspected, as given.
        rows: one dict per tensor, in checkpoint order: ``name``, ``shape`` (list), ``dtype``, then
            either the metrics of ``matrix_metrics`` by their names or ``skipped`` (the reason).
        spectra: the eigenvalues of ``W^T W`` (``sigma^2``, float64, largest first) of the matrices
            chosen for a spectrum plot (:func:`spectrum_choice`), by tensor name.
    """

    source: str
    rows: list[dict[str, Any]]
    spectra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def metric_names(self) -> list[str]:
        """The metric columns, in the order ``matrix_metrics`` returns them."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(k for k in row if k not in _ROW_KEYS and k != _SKIPPED))
        return list(names)

    @property
    def columns(self) -> list[str]:
        """Every column of the table: ``name``, ``shape``, ``dtype``, the metrics, ``skipped``."""
        return [*_ROW_KEYS, *self.metric_names, _SKIPPED]

    def json_rows(self) -> list[dict[str, Any]]:
        """:attr:`rows` ready for strict JSON: a NaN or infinite metric becomes ``None`` (null)."""
        return [{key: _number(value) for key, value in row.items()} for row in self.rows]

    def table_rows(self) -> list[dict[str, Any]]:
        """Every row with every column of :attr:`columns` (``None`` where it has no value) and the shape as
        ``"768x384"``: the cells of the CSV, the DataFrame and the HTML table."""
        return [
            {
                column: _shape_text(row["shape"]) if column == "shape" else row.get(column)
                for column in self.columns
            }
            for row in self.rows
        ]

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` (one row per tensor; missing metrics are NaN/None).

        Raises:
            WeightkitError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError:
            raise WeightkitError(
                "InspectResult.to_pandas needs pandas, which is not installed: pip install pandas "
                "(or use result.rows or result.to_csv)"
            ) from None
        return pd.DataFrame(self.table_rows(), columns=self.columns)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the rows as CSV (header = :attr:`columns`; an empty cell where a row has no value)."""
        path = Path(path)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.table_rows())
        return path


def _shape_text(shape: list[int]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _scalar(key: str, value: Any) -> float | int | str | bool | None:
    """A metric's value as a plain Python scalar (a 0-d tensor or numpy scalar unwrapped)."""
    if key in (*_ROW_KEYS, _SKIPPED):
        raise WeightkitError(
            f"matrix_metrics returned {key!r}, a name the report reserves for its own column"
        )
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is not None and not isinstance(value, (int, float, str, bool)):
        raise WeightkitError(
            f"matrix_metrics returned {key!r} as a {type(value).__name__}; a report column holds one number "
            "or word per matrix"
        )
    return value


def _not_a_matrix(shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """Why a tensor of this shape and dtype is not analysed, or None when it is a weight matrix."""
    if len(shape) == 0:
        return "a scalar, not a matrix"
    if len(shape) == 1:
        return "1-D (a bias or a norm's scale), not a matrix"
    if len(shape) > 2:
        return f"{len(shape)}-D (a convolution kernel or stacked weights), not a matrix"
    if dtype.is_complex:
        return f"{str(dtype).removeprefix('torch.')} values, not real-valued weights"
    if not dtype.is_floating_point:
        return (
            f"{str(dtype).removeprefix('torch.')} values (codes, indices or masks), not real-valued weights"
        )
    return None


def spectrum_choice(matrices: Sequence[str], count: int) -> list[str]:
    """Which of ``matrices`` (checkpoint order) get a spectrum plot: all of them when there are at most
    ``count``, else ``count`` evenly spaced ones, the first and the last included.

    Raises:
        WeightkitError: ``count`` is negative.
    """
    if count < 0:
        raise WeightkitError(f"the number of spectrum plots must be >= 0, got {count}")
    n = len(matrices)
    if count >= n:
        return list(matrices)
    if count == 1:
        return [matrices[0]]
    return [matrices[round(i * (n - 1) / (count - 1))] for i in range(count)]


def _refuse_quantized_tensors(reader: CheckpointReader) -> None:
    """Refuse a checkpoint holding quantized tensors even without a config.json that says so (a bare
    .safetensors file of a quantized model)."""
    found = next((n for n in reader.names() if n.rsplit(".", 1)[-1] in _QUANTIZED_TENSORS), None)
    if found is not None:
        raise WeightkitError(
            f"{reader.path} holds quantized tensors ({found}): weightkit inspect needs full-precision "
            "weights; inspect the model before it was quantized"
        )


def inspect_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    spectra: int = 12,
    progress: bool = False,
) -> InspectResult:
    """The per-matrix metrics of every tensor of a checkpoint, read one tensor at a time.

    Args:
        path: a Hugging Face model directory or a ``.safetensors`` file.
        device: where the metrics are computed (default: cuda when available, else cpu).
        allow_pickle: read ``.bin``/``.pt`` pickle checkpoints (trusted files only).
        spectra: how many matrices keep their eigenvalues for a spectrum plot (:func:`spectrum_choice`).
        progress: show a progress bar over the tensors.

    Raises:
        WeightkitError: the checkpoint cannot be read (named by the reader), or it is quantized.
    """
    refuse_quantized(
        path,
        verb="weightkit inspect",
        instead="inspect the model before it was quantized (dequantized inspection is not supported yet)",
    )
    device = resolve_device(device)
    rows = []
    kept: dict[str, Tensor] = {}
    with CheckpointReader(path, allow_pickle=allow_pickle) as reader:
        _refuse_quantized_tensors(reader)
        names = reader.names()
        matrices = [n for n in names if _not_a_matrix(reader.shape(n), reader.dtype(n)) is None]
        plotted = set(spectrum_choice(matrices, spectra))
        for name in track(names, "inspecting tensors", enabled=progress):
            shape, dtype = reader.shape(name), reader.dtype(name)
            dtype_name = str(dtype).removeprefix("torch.")
            row: dict[str, Any] = {"name": name, "shape": list(shape), "dtype": dtype_name}
            rows.append(row)
            reason = _not_a_matrix(shape, dtype)
            if reason is not None:
                row[_SKIPPED] = reason
                continue
            weight = reader.get(name).to(device)
            try:
                metrics = matrix_metrics(weight)
                if name in plotted:
                    kept[name] = singular_values(weight).square().cpu()
            except WeightkitError as err:
                row[_SKIPPED] = str(err)
                continue
            finally:
                del weight  # the next tensor is read only after this one is released
            row.update({key: _scalar(key, value) for key, value in metrics.items()})
    return InspectResult(source=str(path), rows=rows, spectra=kept)


# -- the report ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One plot of a section.

    Attributes:
        name: its file name under ``plots/`` without ``.png`` (unique within a report).
        title: the caption shown under it.
        png: the PNG file's bytes (:mod:`weightkit.inspect.plots`).
    """

    name: str
    title: str
    png: bytes


@dataclass
class Section:
    """One part of the report: a heading, an optional note, a table and figures.

    Attributes:
        title: the heading.
        rows: the table, one dict per row (columns: the union of the keys, first-seen order).
        figures: plots shown under the table.
        note: a paragraph shown under the heading (plain text).
    """

    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    note: str = ""


def _number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fit(row: dict[str, Any]) -> tuple[float, float] | None:
    """``(alpha, xmin)`` of a row whose power-law fit can be drawn, else None."""
    alpha, xmin = row.get("alpha"), row.get("xmin")
    if isinstance(alpha, (int, float)) and isinstance(xmin, (int, float)) and alpha > 1 and xmin > 0:
        return float(alpha), float(xmin)
    return None


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def metric_sections(result: InspectResult) -> list[Section]:
    """The report's sections for ``result``: the per-matrix table with one bar plot per metric of
    :data:`BAR_METRICS` that the rows hold, and the spectra kept in ``result.spectra``."""
    analysed = [row for row in result.rows if _SKIPPED not in row]
    names = [row["name"] for row in analysed]
    bars = [
        Figure(
            f"bars_{metric}",
            f"{metric} per weight matrix, in checkpoint order",
            metric_bars_png(names, [_number(row.get(metric)) for row in analysed], metric=metric),
        )
        for metric in BAR_METRICS
        if any(isinstance(_number(row.get(metric)), (int, float)) for row in analysed)
    ]
    skipped = len(result.rows) - len(analysed)
    table = Section(
        "Weight matrices",
        rows=result.table_rows(),  # every column in every row: the metrics before the skip reasons
        figures=bars,
        note=f"{len(analysed)} matrices analysed, {skipped} tensors skipped (the reason is in their row).",
    )
    by_name = {row["name"]: row for row in result.rows}
    spectra = []
    for name, eigenvalues in result.spectra.items():
        fit = _fit(by_name[name])
        alpha, xmin = fit if fit else (None, None)
        title = f"{name}: eigenvalues of WᵀW" + (f", power-law fit alpha={alpha:.3g}" if fit else "")
        png = spectrum_png(eigenvalues, title=name, alpha=alpha, xmin=xmin)
        spectra.append(Figure(f"spectrum_{_file_stem(name)}", title, png))
    shown = f"{len(spectra)} of the {len(analysed)} matrices, evenly spaced over the checkpoint"
    return [table, Section("Spectra", figures=spectra, note=f"Empirical spectral densities of {shown}.")]


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .8em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.text { text-align: left; } tr.skipped td { color: #888; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #555; max-width: 600px; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return _shape_text(value)
    return str(value)


def _table_html(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = "".join(
            f"<td{'' if isinstance(row.get(c), (int, float)) else ' class=text'}>"
            f"{html.escape(_cell(row.get(c)))}</td>"
            for c in columns
        )
        body.append(f"<tr{' class=skipped' if row.get(_SKIPPED) else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html(title: str, sections: Sequence[Section]) -> str:
    """The report page: CSS inline, every plot a base64 ``data:`` URI, no script and nothing to fetch."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.note:
            parts.append(f"<p>{html.escape(section.note)}</p>")
        if section.rows:
            parts.append(_table_html(section.rows))
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}">'
                f"<figcaption>{html.escape(figure.title)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def check_report_target(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse a report directory that exists and is not empty unless ``overwrite``; even then, refuse one
    that does not look like an earlier report (no report.html or metrics.json), so a mistyped path cannot
    delete unrelated files. Called before the work, and again just before the report is published.

    Raises:
        WeightkitError: naming ``out_dir`` and the reason.
    """
    out = Path(out_dir)
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise WeightkitError(f"{out_dir} exists and is not a directory; refusing to replace it")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise WeightkitError(f"{out_dir} exists and is not empty; pass --force to overwrite it")
    if not any((out / name).is_file() for name in _REPORT_FILES):
        raise WeightkitError(
            f"{out_dir} exists and does not look like a weightkit report (no report.html or metrics.json); "
            "refusing to replace it even with --force"
        )


def _fsync_tree(root: Path) -> None:
    # The files must be on disk before the rename publishes the directory (as the checkpoint writer does).
    for directory, _, files in os.walk(root, topdown=False):
        for name in [*files, ""]:
            fd = os.open(os.path.join(directory, name) if name else directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_report(
    result: InspectResult,
    out_dir: str | os.PathLike,
    *,
    sections: Sequence[Section] = (),
    overwrite: bool = False,
) -> Path:
    """Write the report directory: ``metrics.json`` (the rows), ``metrics.csv``, ``plots/*.png`` and
    ``report.html`` (self-contained: the plots embedded, opens offline).

    The page holds :func:`metric_sections` of ``result`` followed by ``sections``; adding a part to the
    report is adding a :class:`Section` there.

    Returns:
        ``out_dir``.

    Raises:
        WeightkitError: ``out_dir`` cannot be written (:func:`check_report_target`, or the write failed),
            or two figures share a name. Nothing changes at ``out_dir`` then.
    """
    target = Path(os.path.abspath(out_dir))
    check_report_target(out_dir, overwrite=overwrite)
    all_sections = [*metric_sections(result), *sections]
    figures = [figure for section in all_sections for figure in section.figures]
    duplicates = sorted({f.name for f in figures if sum(g.name == f.name for g in figures) > 1})
    if duplicates:
        raise WeightkitError(f"two report figures share the file name {duplicates[0]!r}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise WeightkitError(f"cannot create a directory beside {out_dir}: {err.strerror or err}") from err
    try:
        text = json.dumps(result.json_rows(), indent=2, allow_nan=False) + "\n"
        (tmp / "metrics.json").write_text(text, encoding="utf-8")
        result.to_csv(tmp / "metrics.csv")
        (tmp / "plots").mkdir()
        for figure in figures:
            (tmp / "plots" / f"{figure.name}.png").write_bytes(figure.png)
        title = f"weightkit inspect: {result.source}"
        (tmp / "report.html").write_text(_html(title, all_sections), encoding="utf-8")
        default_permissions(tmp)
        _fsync_tree(tmp)
        check_report_target(out_dir, overwrite=overwrite)  # it may have appeared meanwhile
        if target.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except OSError as err:  # disk full, quota, permissions: one message, and nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise WeightkitError(f"writing {out_dir} failed: {err}. Nothing was written to {out_dir}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)
