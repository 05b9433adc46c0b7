"""``weightkit inspect``: a weight-space report of a checkpoint (table, JSON, CSV, plots, HTML)."""

import argparse
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from weightkit.cli.common import common_options
from weightkit.progress import results

# The metrics the terminal table shows, in this order, when matrix_metrics returns them (the report
# files hold all of them).
_TABLE_METRICS = ("alpha", "stable_rank", "effective_rank", "rank_90", "mp_outliers", "welore_label", "svd")

_COLUMNS_HELP = """\
columns (one row per tensor, in checkpoint order; --json uses these names):
  name            the tensor's name in the checkpoint
  shape, dtype    as stored
  stable_rank     ||W||_F^2 / ||W||_2^2: how many directions carry the energy (1 = rank one)
  effective_rank  Roy & Vetterli: exp of the entropy of the normalised singular values
  rank_90/rank_99 the fewest singular values holding 90%/99% of ||W||_F^2
  alpha, alpha_weighted, xmin, ks_distance
                  power-law fit of the eigenvalues of W^T W (weightwatcher's estimator) and its
                  log10(largest eigenvalue)-weighted alpha, the fit's lower bound and KS distance
  spectral_norm, frobenius_norm
  mp_outliers     eigenvalues above the Marchenko-Pastur bulk edge
  gg_shape, gg_scale   generalized-Gaussian fit of the weight values
  welore_ratio, welore_label   WeLore's rank-reduction ratio and LRC / N-LRC label
  svd             which SVD computed the singular values (randomized for huge matrices)
  skipped         why a tensor has no metrics: not a matrix (bias, norm, conv kernel, scalar),
                  integer data, or a matrix the metrics refuse (all zeros, NaN/Inf)
  A metric column appears when this version of weightkit computes it; the terminal table shows the
  main ones, the report files all of them.

--json prints the rows as a JSON list, one object per tensor with the names above (stdout holds
nothing else; a metric that could not be computed is null).

report directory: metrics.json (the rows), metrics.csv, plots/*.png (per-layer bars of the main
metrics; spectra of --spectra matrices) and report.html (self-contained, opens offline).

examples:
  weightkit inspect ./my-model -o ./my-model-report
  weightkit inspect ./model.safetensors -o report --json > rows.json"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    present = {key for row in rows for key in row}
    metrics = [m for m in _TABLE_METRICS if m in present]
    table = Table(title="weightkit inspect")
    # Numbers stay whole; on a narrow terminal the names and the reasons of skipped rows wrap instead.
    table.add_column("name", justify="left", overflow="fold")
    table.add_column("shape", justify="right", no_wrap=True)
    for metric in metrics:
        table.add_column(metric, justify="right", no_wrap=True)
    table.add_column("skipped", justify="left", style="dim", overflow="fold")
    for row in rows:
        shape = "x".join(map(str, row["shape"])) or "scalar"
        table.add_row(row["name"], shape, *(_cell(row.get(m)) for m in metrics), row.get("skipped", ""))
    results.print(table)


def _cmd_inspect(args: argparse.Namespace) -> list[dict[str, Any]]:
    from weightkit.inspect.report import check_report_target, inspect_checkpoint, write_report

    out = Path(args.output)
    check_report_target(out, overwrite=args.force)  # before the work, not after it
    start = time.perf_counter()
    result = inspect_checkpoint(
        args.model,
        device=args.device,
        allow_pickle=args.allow_pickle,
        spectra=args.spectra,
        progress=not args.json,
    )
    write_report(result, out, overwrite=args.force)
    if not args.json:
        _print_rows(result.rows)
        seconds = time.perf_counter() - start
        results.print(f"report written to [bold]{out}[/bold] ({seconds:.1f} s): open {out / 'report.html'}")
    return result.json_rows()


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_parsers(sub) -> None:
    """Add ``inspect`` to the ``weightkit`` subcommands."""
    p = sub.add_parser(
        "inspect",
        help="report what a checkpoint's weight matrices look like (spectra, ranks) as a table and HTML",
        description=(
            "Read a checkpoint one tensor at a time (no model is built), compute the spectral metrics of "
            "every weight matrix and write a report directory; print a table of the main metrics."
        ),
        epilog=_COLUMNS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="Hugging Face model directory or .safetensors file")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="report directory (must not exist or be empty unless --force; only an earlier report is "
        "replaced)",
    )
    p.add_argument(
        "--spectra",
        type=_count,
        default=12,
        metavar="N",
        help="how many matrices get a spectrum plot: all of them when the checkpoint has at most this many, "
        "else this many evenly spaced in checkpoint order, first and last included; 0 for none "
        "(default: 12)",
    )
    p.set_defaults(run=_cmd_inspect)
    common_options(p, force=True, allow_pickle=True, device=True)
