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
comparison ...), all rendered the same way. The builders of those other sections are here too, each
taking the result of one analysis (:func:`comparison_sections`, :func:`similarity_sections`,
:func:`hessian_section`, :func:`barrier_section`, :func:`intrinsic_dimension_section`): their tables hold
the scalar columns, and what is a list or a matrix per row (top singular values, cosine matrices, curves)
becomes a figure. The directory is written beside its target and renamed into place when complete, as
the checkpoint writer does, so a failure never leaves a half-written report.
"""

import base64
import csv
import html
import json
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader
from weightkit.checkpoint.writer import default_permissions
from weightkit.errors import WeightkitError
from weightkit.inspect.change import Table
from weightkit.inspect.metrics import matrix_metrics_with_spectrum
from weightkit.inspect.plots import (
    comparison_bars_png,
    heatmap_png,
    line_plot_png,
    metric_bars_png,
    metric_panels_png,
    spectrum_png,
)
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
    "strict_json",
    "comparison_sections",
    "similarity_sections",
    "hessian_section",
    "barrier_section",
    "intrinsic_dimension_section",
    "BAR_METRICS",
]

# The columns every row has before its metrics, and the one a skipped row has instead of them.
_ROW_KEYS = ("name", "shape", "dtype")
_SKIPPED = "skipped"
# Each analysed row's singular values (a list, largest first): in the JSON rows, not in the table's columns.
_SPECTRUM = "singular_values"
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
# AWQ, weightkit's VPTQ codebooks): read as stored they are integer codes and scales, not the weights.
_QUANTIZED_TENSORS = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "qweight",
    "qzeros",
    "weight_codebook",
)
# Files of a report: a --force overwrite replaces only a directory holding one of them (or nothing).
_REPORT_FILES = ("report.html", "metrics.json")
# What write_report always writes itself: no extra JSON file may take one of these names.
_OWN_FILES = ("report.html", "metrics.json", "metrics.csv", "plots")
# At most this many differences get a line in the plot of their top singular values (evenly spaced).
_SPECTRUM_LINES = 8


@dataclass
class InspectResult:
    """What :func:`inspect_checkpoint` found.

    Attributes:
        source: the checkpoint inspected, as given.
        rows: one dict per tensor, in checkpoint order: ``name``, ``shape`` (list), ``dtype``, then
            either the metrics of ``matrix_metrics`` by their names and ``singular_values`` (a list, largest
            first; the top ones only where the ``svd`` column says randomized), or ``skipped`` (the reason).
            The singular values are in the JSON rows, not in the table's columns (CSV, DataFrame, HTML).
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
            names.update(dict.fromkeys(k for k in row if k not in (*_ROW_KEYS, _SKIPPED, _SPECTRUM)))
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
    if key in (*_ROW_KEYS, _SKIPPED, _SPECTRUM):
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


def _analysed(weight: Tensor) -> tuple[dict[str, Any], Tensor] | str:
    """``(metrics, singular values on the CPU)`` of one matrix, or why :func:`matrix_metrics` refused it."""
    try:
        metrics, spec = matrix_metrics_with_spectrum(weight)
    except WeightkitError as err:
        return str(err)
    return metrics, spec.values.cpu()


def inspect_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    spectra: int = 12,
    progress: bool = False,
) -> InspectResult:
    """The per-matrix metrics of every tensor of a checkpoint, read one tensor at a time.

    On the CPU with ``n = torch.get_num_threads()`` above 1, up to ``n`` matrices are analysed at once, each
    on one thread (torch is set to one thread meanwhile and restored after): the spectrum's ``eigvalsh`` is
    a chain of small steps that gains little from a second thread, so two matrices side by side finish
    sooner than two threads on each in turn (measured by bench/inspect_bench.py). Matrices in flight hold
    at most as many entries together as the checkpoint's largest matrix, so peak memory is that of one
    matrix at a time; a matrix too large to share that budget (the embeddings, ``lm_head``) is analysed
    alone, on every thread. With one thread, or on a GPU, one matrix at a time.

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
    threads = torch.get_num_threads()
    workers = threads if device.type == "cpu" else 1
    rows = []
    kept: dict[str, Tensor] = {}
    pending: deque[tuple[dict[str, Any], int, Future]] = deque()

    def in_flight() -> int:
        return sum(entries for _, entries, _ in pending)

    def finish_oldest() -> None:
        row, _, future = pending.popleft()
        record(row, future.result())

    def record(row: dict[str, Any], outcome: tuple[dict[str, Any], Tensor] | str) -> None:
        if isinstance(outcome, str):
            row[_SKIPPED] = outcome
            return
        metrics, values = outcome
        row.update({key: _scalar(key, value) for key, value in metrics.items()})
        row[_SPECTRUM] = values.tolist()
        if row["name"] in plotted:
            kept[row["name"]] = values.square()

    with CheckpointReader(path, allow_pickle=allow_pickle) as reader, ThreadPoolExecutor(workers) as pool:
        _refuse_quantized_tensors(reader)
        names = reader.names()
        matrices = [n for n in names if _not_a_matrix(reader.shape(n), reader.dtype(n)) is None]
        plotted = set(spectrum_choice(matrices, spectra))
        budget = max((math.prod(reader.shape(n)) for n in matrices), default=0)  # entries in flight
        try:
            for name in track(names, "inspecting tensors", enabled=progress):
                shape, dtype = reader.shape(name), reader.dtype(name)
                dtype_name = str(dtype).removeprefix("torch.")
                row: dict[str, Any] = {"name": name, "shape": list(shape), "dtype": dtype_name}
                rows.append(row)
                reason = _not_a_matrix(shape, dtype)
                if reason is not None:
                    row[_SKIPPED] = reason
                    continue
                entries = math.prod(shape)
                alone = workers == 1 or 2 * entries > budget
                # The next tensor is read only when a worker is free and the entries in flight allow it.
                while pending and (alone or len(pending) >= workers or in_flight() + entries > budget):
                    finish_oldest()
                if alone:  # in this thread, on every thread: released before the next tensor is read
                    torch.set_num_threads(threads)
                    record(row, _analysed(reader.get(name).to(device)))
                else:  # the workers run while torch is on one thread (its setting is the process's)
                    torch.set_num_threads(1)
                    pending.append((row, entries, pool.submit(_analysed, reader.get(name).to(device))))
            while pending:
                finish_oldest()
        finally:
            for _, _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            torch.set_num_threads(threads)
    # Rows keep checkpoint order; spectra too (they were kept as their matrices finished, in that order).
    return InspectResult(source=str(path), rows=rows, spectra={n: kept[n] for n in matrices if n in kept})


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
    """The report's sections for ``result``: the per-matrix table with one figure of bars per layer, a panel
    for each metric of :data:`BAR_METRICS` that the rows hold, and the spectra kept in ``result.spectra``."""
    analysed = [row for row in result.rows if _SKIPPED not in row]
    names = [row["name"] for row in analysed]
    columns = {metric: [_number(row.get(metric)) for row in analysed] for metric in BAR_METRICS}
    series = {m: values for m, values in columns.items() if any(isinstance(v, (int, float)) for v in values)}
    title = f"{', '.join(series)} per weight matrix, in checkpoint order"
    bars = [Figure("metrics_per_layer", title, metric_panels_png(names, series))] if series else []
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


def strict_json(value: Any) -> Any:
    """``value`` ready for strict JSON, recursively: a NaN or infinite float becomes ``None`` (null), a tuple
    a list, a mapping's keys strings."""
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return {str(key): strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def _scalar_columns(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows without the columns that hold a list or a matrix in some row (``shape`` excepted, shown as
    ``768x384``): those are drawn as figures, not put in table cells."""
    bulky = {k for row in rows for k, v in row.items() if k != "shape" and isinstance(v, (list, tuple, dict))}
    return [{k: v for k, v in row.items() if k not in bulky} for row in rows]


def _summary_text(summary: dict[str, Any]) -> str:
    """The scalar entries of a summary as ``key: value`` pairs (its lists and matrices are figures)."""
    return ", ".join(
        f"{key}: {_cell(value) or 'n/a'}"
        for key, value in summary.items()
        if not isinstance(value, (list, dict))
    )


def _bars(name: str, title: str, rows: Sequence[dict[str, Any]], metric: str) -> list[Figure]:
    """A bar per row of ``metric`` (rows by ``name``), or no figure when no row has a finite value."""
    values = [_number(row.get(metric)) for row in rows]
    if not any(isinstance(v, (int, float)) for v in values):
        return []
    return [Figure(name, title, metric_bars_png([row["name"] for row in rows], values, metric=metric))]


def _change_figures(stem: str, table: Table) -> list[Figure]:
    figures = _bars(
        f"{stem}_relative_change", "relative change ||B - A||_F / ||A||_F per tensor", table.rows,
        "relative_change",
    )  # fmt: skip
    by_name = {row["name"]: row for row in table.rows if row.get("delta_singular_values")}
    chosen = spectrum_choice(list(by_name), _SPECTRUM_LINES)
    if chosen:
        series = {
            name: (
                range(1, len(by_name[name]["delta_singular_values"]) + 1),
                by_name[name]["delta_singular_values"],
            )
            for name in chosen
        }
        png = line_plot_png(
            series,
            title="top singular values of ΔW = B - A",
            xlabel="index",
            ylabel="singular value",
            log_y=True,
        )
        shown = f"{len(chosen)} of the {len(by_name)} changed matrices, evenly spaced in checkpoint order"
        figures.append(Figure(f"{stem}_delta_spectra", f"top singular values of ΔW, {shown}", png))
    return figures


def _quantization_figures(stem: str, table: Table) -> list[Figure]:
    quantized = [row for row in table.rows if row.get("quantized")]
    return _bars(
        f"{stem}_sqnr_db", "SQNR (dB) per quantized layer (an exact copy, infinite SQNR, has no bar)",
        quantized, "sqnr_db",
    )  # fmt: skip


def _adapter_figures(stem: str, table: Table) -> list[Figure]:
    if not table.rows:
        return []
    names = [row["name"] for row in table.rows]

    def values(key: str) -> list[float]:
        return [math.nan if row.get(key) is None else row[key] for row in table.rows]

    ranks = comparison_bars_png(
        names,
        {"nominal rank r": values("rank"), "effective rank of ΔW": values("effective_rank"),
         "stable rank of ΔW": values("stable_rank")},
        title="adapter rank per module", ylabel="rank",
    )  # fmt: skip
    return [
        Figure(f"{stem}_ranks", "nominal, effective and stable rank of each module's ΔW = s·BA", ranks),
        *_bars(f"{stem}_norm", "||ΔW||_F per adapted module", table.rows, "frobenius_norm"),
    ]


def _task_vector_figures(stem: str, table: Table) -> list[Figure]:
    models = table.summary["models"]
    cosine = torch.tensor(table.summary["cosine"], dtype=torch.float64)
    heatmap = heatmap_png(
        cosine, row_labels=models, col_labels=models, title="cosine of the task vectors", value_label="cosine"
    )
    return [
        Figure(
            f"{stem}_cosine",
            "cosine between the task vectors θ_i - θ_base, each over the whole model",
            heatmap,
        ),
        *_bars(
            f"{stem}_sign_conflicts", "TIES sign-conflict rate per tensor", table.rows, "sign_conflict_rate"
        ),
    ]


# What each kind of comparison of weightkit.inspect.compare.compare (its table names' prefix) is, and draws.
_COMPARISONS = {
    "change": ("Per-tensor change from MODEL (A) to the other checkpoint (B)", _change_figures),
    "quantization": ("Per-layer quantization error of a quantized copy of MODEL", _quantization_figures),
    "adapter": ("What a PEFT LoRA adapter changes: ΔW = s·BA per adapted module", _adapter_figures),
    "task_vectors": ("Agreement of the task vectors θ_i - θ_MODEL of the fine-tunes", _task_vector_figures),
}


def comparison_sections(tables: dict[str, Table]) -> list[Section]:
    """One section per table of :func:`weightkit.inspect.compare.compare` (its name says its kind:
    ``change:``, ``quantization:``, ``adapter:`` or ``task_vectors``): the rows' scalar columns as the
    table, the summary as the note, and the figures of that kind (relative change and ΔW's top singular
    values; SQNR per layer; the adapter's ranks and norms; the task vectors' cosine heatmap and sign
    conflicts per tensor).

    Raises:
        WeightkitError: a table name of an unknown kind.
    """
    sections = []
    for i, (name, table) in enumerate(tables.items()):
        kind = name.split(":", 1)[0]
        if kind not in _COMPARISONS:
            raise WeightkitError(
                f"no report section for a comparison named {name!r} (kinds: {list(_COMPARISONS)})"
            )
        what, figures = _COMPARISONS[kind]
        note = f"{what}. Summary: {_summary_text(table.summary)}."
        if kind == "task_vectors":
            trim = table.summary["density"]
            how = "raw task vectors" if trim is None else f"each trimmed to its top {trim:g} share per tensor"
            note += (
                f" Sign-conflict rate over the model ({how}): {_cell(table.summary['sign_conflict_rate'])}."
            )
        sections.append(
            Section(
                f"Comparison: {name}",
                rows=_scalar_columns(table.rows),
                figures=figures(f"compare{i}", table),
                note=note,
            )
        )
    return sections


def similarity_sections(
    activations: Any | None, weight_rows: Sequence[dict[str, Any]], candidates: Sequence[dict[str, Any]]
) -> list[Section]:
    """The layer-similarity sections: the activation similarity of consecutive blocks (an
    :class:`~weightkit.inspect.similarity.ActivationSimilarity`, or None when no data was run) with the
    block x block CKA heatmap and bars of each block's output-vs-input CKA and cosine; the weight similarity
    rows of :func:`~weightkit.inspect.similarity.weight_similarity` with their cosines per block pair and
    role; the candidates of :func:`~weightkit.inspect.similarity.redundant_blocks`."""
    sections = []
    if activations is not None:
        blocks = [row["block"] for row in activations.rows]
        heatmap = heatmap_png(
            activations.cka_matrix, row_labels=activations.labels, col_labels=activations.labels,
            title="linear CKA between the blocks' outputs", value_label="linear CKA",
        )  # fmt: skip
        in_out = comparison_bars_png(
            blocks,
            {"CKA(input, output)": [row["cka_in_out"] for row in activations.rows],
             "token cosine(input, output)": [row["cosine_in_out"] for row in activations.rows]},
            title="how little each block changes its input (1: not at all)", ylabel="similarity",
        )  # fmt: skip
        tokens = f"on the first {activations.heatmap_tokens} tokens"
        sections.append(
            Section(
                "Layer similarity: activations",
                rows=list(activations.rows),
                figures=[
                    Figure(
                        "similarity_cka", f"linear CKA between every two blocks' outputs, {tokens}", heatmap
                    ),
                    Figure(
                        "similarity_in_out",
                        "CKA and mean token cosine of each block's output and input",
                        in_out,
                    ),
                ],
                note=(
                    "Each block's output against its input (cka_in_out, cosine_in_out: ShortGPT's block "
                    "influence is 1 - cosine) and against the next block's output (cka_next, cosine_next), "
                    f"over every non-padding token of the calibration data; the heatmap is {tokens}."
                ),
            )
        )
    if weight_rows:
        pairs = list(dict.fromkeys(f"{row['block']} → {row['next']}" for row in weight_rows))
        roles = list(dict.fromkeys(row["role"] for row in weight_rows))
        cosine = {(f"{row['block']} → {row['next']}", row["role"]): row["cosine"] for row in weight_rows}
        series = {
            role: [math.nan if cosine.get((pair, role)) is None else cosine[(pair, role)] for pair in pairs]
            for role in roles
        }
        png = comparison_bars_png(pairs, series, title="weight cosine of consecutive blocks", ylabel="cosine")
        sections.append(
            Section(
                "Layer similarity: weights",
                rows=list(weight_rows),
                figures=[
                    Figure("similarity_weights", "cosine of each layer's weights with the next block's", png)
                ],
                note="Each linear layer of a block against the same layer of the next block (no data used).",
            )
        )
    sections.append(
        Section(
            "Redundant blocks",
            rows=list(candidates),
            note=(
                "Candidates to drop (output nearly equal to input: token cosine and CKA >= 0.95) or to share "
                "(every layer's weight cosine with the previous block >= 0.9); thresholds are this report's "
                "heuristic, not a paper's. " + ("" if candidates else "No block is a candidate.")
            ),
        )
    )
    return sections


def hessian_section(result: dict[str, Any]) -> Section:
    """The Hessian's top eigenvalues (a table) and its eigenvalue density (a plot, log y), from
    :func:`weightkit.cli.inspect_extras.hessian_run`'s result."""
    xs, ys = zip(*result["density"], strict=True)
    png = line_plot_png(
        {"SLQ density": (xs, ys)}, title="Hessian eigenvalue density", xlabel="eigenvalue", ylabel="density",
        log_y=True,
    )  # fmt: skip
    return Section(
        "Curvature: Hessian of the loss",
        rows=[{"rank": i + 1, "eigenvalue": value} for i, value in enumerate(result["eigenvalues"])],
        figures=[
            Figure("hessian_density", f"eigenvalue density (Gaussian width {result['sigma']:.3g})", png)
        ],
        note=(
            f"Top eigenvalues by Lanczos and the density by stochastic Lanczos quadrature of the loss "
            f"{result['loss']:.4g} on {result['examples']} examples, w.r.t. all {result['parameters']} "
            f"parameters ({result['iterations']} Lanczos steps, {result['probes']} probes, "
            f"{result['seconds']:.1f} s)."
        ),
    )


def barrier_section(result: dict[str, Any], model: str, other: str) -> Section:
    """The loss barrier between ``model`` and ``other`` before (and after) permutation alignment (a table)
    and the loss along the straight line between them (a plot), from
    :func:`weightkit.cli.inspect_extras.barrier_run`'s result."""
    paths = {"before alignment": result["before"]}
    if result["after"] is not None:
        paths["after alignment"] = result["after"]
    rows = [
        {"path": label, "barrier": path.barrier, "barrier_t": path.barrier_t, "loss_t0": path.losses[0],
         "loss_t1": path.losses[-1], "loss_max": max(path.losses)}
        for label, path in paths.items()
    ]  # fmt: skip
    png = line_plot_png(
        {label: (path.ts, path.losses) for label, path in paths.items()},
        title="loss along (1 - t) MODEL + t OTHER", xlabel="t", ylabel="loss",
    )  # fmt: skip
    return Section(
        f"Linear mode connectivity: {model} → {other}",
        rows=rows,
        figures=[Figure("barrier", "loss along the straight line between the checkpoints", png)],
        note=(
            "barrier = max over t of L(t) - ((1 - t) L(0) + t L(1)): 0 when the path never rises above the "
            "chord between its ends."
        ),
    )


def intrinsic_dimension_section(result: dict[str, Any]) -> Section:
    """The d90 search (a table of its runs) and the score-vs-d curve (log x) with its threshold, from
    :func:`weightkit.cli.inspect_extras.intrinsic_dimension_run`'s result."""
    found = result["intrinsic"]
    metric = result["metric"]
    png = line_plot_png(
        {"subspace fine-tune": ([d for d, _ in found.curve], [score for _, score in found.curve])},
        title=f"{metric} after training d numbers (full fine-tune: {found.full_score:.4g})", xlabel="d",
        ylabel=metric, log_x=True, hline=(found.threshold, f"90% threshold {found.threshold:.4g}"),
    )  # fmt: skip
    rows = [
        {"d": run["d"], "score": run["score"], "trainable_parameters": run["trainable_parameters"]}
        for run in result["runs"]
    ]
    d90 = "not reached in the range tried" if found.d90 is None else str(found.d90)
    return Section(
        "Intrinsic dimension",
        rows=rows,
        figures=[Figure("intrinsic_dimension", f"{metric} against the subspace dimension d", png)],
        note=(
            f"d90 = {d90}: the smallest d whose {metric} reaches {found.threshold:.4g}, "
            f"{found.fraction:g} of the way from {found.reference:.4g} (nothing learned) to the full "
            f"fine-tune's {found.full_score:.4g} ({result['seconds']:.1f} s)."
        ),
    )


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
    rows: Sequence[dict[str, Any]] | None = None,
    json_files: dict[str, Any] | None = None,
) -> Path:
    """Write the report directory: ``metrics.json`` (the rows), ``metrics.csv``, ``plots/*.png`` and
    ``report.html`` (self-contained: the plots embedded, opens offline).

    The page holds :func:`metric_sections` of ``result`` followed by ``sections``; adding a part to the
    report is adding a :class:`Section` there.

    Args:
        rows: what ``metrics.json`` holds instead of ``result.json_rows()`` (the CLI's rows with the
            comparisons nested in them); made strict JSON by :func:`strict_json`.
        json_files: more files of the report, file name -> its content as JSON (:func:`strict_json`),
            e.g. ``{"summary.json": {...}}``.

    Returns:
        ``out_dir``.

    Raises:
        WeightkitError: ``out_dir`` cannot be written (:func:`check_report_target`, or the write failed),
            two figures share a name, or a ``json_files`` name is one of the report's own files or not a
            plain ``.json`` file name. Nothing changes at ``out_dir`` then.
    """
    target = Path(os.path.abspath(out_dir))
    json_files = json_files or {}
    for name in json_files:
        if name in _OWN_FILES or not name.endswith(".json") or Path(name).name != name:
            raise WeightkitError(
                f"{name!r} cannot be an extra file of a report: it must be a plain .json file name other "
                f"than {', '.join(_OWN_FILES)}"
            )
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
        metrics = result.json_rows() if rows is None else strict_json(list(rows))
        for name, content in {"metrics.json": metrics, **json_files}.items():
            text = json.dumps(strict_json(content), indent=2, allow_nan=False) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
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
