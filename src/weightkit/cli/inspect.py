"""``weightkit inspect``: a weight-space report of a checkpoint (table, JSON, CSV, plots, HTML), and with
its options the analyses that compare it with other checkpoints (``--compare``), run it on data
(``--similarity``, ``--hessian``, ``--barrier``, ``--intrinsic-dim``): each adds sections to the report,
per-tensor numbers to the JSON rows (comparisons) or model-level results to ``summary.json``."""

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from weightkit.cli.common import common_options
from weightkit.errors import WeightkitError
from weightkit.progress import results

# The metrics the terminal table shows, in this order, when matrix_metrics returns them (the report
# files hold all of them).
_TABLE_METRICS = ("alpha", "stable_rank", "effective_rank", "welore_label")

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
  singular_values the matrix's singular values, largest first (JSON only: --json and metrics.json; the
                  top ones alone when svd says randomized)
  skipped         why a tensor has no metrics: not a matrix (bias, norm, conv kernel, scalar),
                  integer data, or a matrix the metrics refuse (all zeros, NaN/Inf)
  A metric column appears when this version of weightkit computes it; the terminal table shows the
  main ones, the report files all of them.

--json prints the rows as a JSON list, one object per tensor with the names above (stdout holds
nothing else; a metric that could not be computed is null).

report directory: metrics.json (the rows, as --json prints them), metrics.csv (the matrix metrics),
plots/*.png (per-layer bars of the main metrics; spectra of --spectra matrices; the plots of the options
below), summary.json (the model-level results of the options below, by option: "compare" (each
comparison's summary by its name), "similarity", "hessian", "barrier", "intrinsic_dimension"; {} when none
ran) and report.html (self-contained, opens offline: a section per analysis).

--compare: each OTHER is, by the first rule that fits, a PEFT LoRA adapter (a directory with
adapter_config.json: the rank, effective rank and norms of its dW = s*BA per module; MODEL is not read),
a compressed-tensors quantized copy of MODEL (config.json with a quantization_config: SQNR and relative
error per layer), or a full checkpoint of the same model (per-tensor relative change, cosine, sign
agreement, rank and top singular values of the difference). Two or more full checkpoints are also taken
as fine-tunes of MODEL: TIES sign-conflict rate and cosine of their task vectors. With --json, the
numbers of comparison OTHER for a tensor are in that tensor's row under "compare" -> OTHER (with "kind":
change, quantization or adapter), the task vectors' under "task_vectors"; a tensor that only a
comparison has (e.g. absent in MODEL) gets a row with "name" and those alone. A NaN or infinite number
is null (the SQNR of an exact copy: its relative_error is 0).

examples:
  weightkit inspect ./my-model -o ./my-model-report
  weightkit inspect ./model.safetensors -o report --json > rows.json
  weightkit inspect ./base -o report --compare ./fine-tune-a ./fine-tune-b ./base-w4 ./lora-adapter
  weightkit inspect ./llama -o report --similarity --data texts.txt --hessian 5 --barrier ./other --align
  weightkit inspect ./encoder -o report --intrinsic-dim 10,100,1000 --data train.jsonl"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    """The analysed matrices with the main metrics (the report files hold every column), then the skipped
    tensors counted by reason: on an 80-column terminal a reason column would squeeze the names away."""
    analysed = [row for row in rows if "skipped" not in row]
    present = {key for row in analysed for key in row}
    metrics = [m for m in _TABLE_METRICS if m in present]
    randomized = any(str(row.get("svd", "full")) != "full" for row in analysed)
    table = Table(title="weightkit inspect", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("name", justify="left", overflow="fold", min_width=14)
    table.add_column("shape", justify="right", no_wrap=True)
    for metric in metrics:
        table.add_column(metric, justify="right", no_wrap=True)
    if randomized:
        table.add_column("svd", justify="left", no_wrap=True)
    for row in analysed:
        cells = [_cell(row.get(m)) for m in metrics] + ([str(row.get("svd"))] if randomized else [])
        table.add_row(row["name"], "x".join(map(str, row["shape"])), *cells)
    results.print(table)
    reasons: dict[str, int] = {}
    for row in rows:
        if "skipped" in row:
            reasons[row["skipped"]] = reasons.get(row["skipped"], 0) + 1
    for reason, count in reasons.items():
        results.print(f"skipped {count} tensor{'s' if count > 1 else ''}: {escape(reason)}", soft_wrap=True)


def _check_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, options that would be ignored or cannot work together."""
    if args.ties_density is not None and len(args.compare or []) < 2:
        raise WeightkitError(
            "--ties-density trims the task vectors of two or more fine-tunes of MODEL: give at least two "
            "full checkpoints with --compare"
        )
    if args.compare and len(set(args.compare)) < len(args.compare):
        raise WeightkitError(f"a checkpoint is given twice to --compare: {args.compare}")
    if args.align and args.barrier is None:
        raise WeightkitError("--align aligns the checkpoint of --barrier OTHER: it needs --barrier")
    if args.said and args.intrinsic_dim is None:
        raise WeightkitError("--said chooses the subspace of --intrinsic-dim: it needs --intrinsic-dim")
    if args.intrinsic_dim is not None and args.data is None:
        raise WeightkitError(
            "--intrinsic-dim fine-tunes the model: it needs --data with the training examples"
        )
    if args.data is not None and not (
        args.similarity or args.hessian is not None or args.barrier is not None or args.intrinsic_dim
    ):
        raise WeightkitError(
            "--data is used by --similarity, --hessian, --barrier and --intrinsic-dim; none of them is given"
        )


def _nested_rows(rows: list[dict[str, Any]], tables: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON rows with each comparison's numbers of a tensor in its row: ``row["compare"][OTHER]`` (with
    ``kind``), ``row["task_vectors"]``; a tensor MODEL has not gets a row of its own after the others."""
    by_name = {row["name"]: row for row in rows}
    extra: dict[str, dict[str, Any]] = {}
    for table_name, table in tables.items():
        kind, _, other = table_name.partition(":")
        for table_row in table.rows:
            name = table_row["name"]
            values = {key: value for key, value in table_row.items() if key != "name"}
            row = by_name.get(name) or extra.setdefault(name, {"name": name})
            if kind == "task_vectors":
                row["task_vectors"] = values
            else:
                row.setdefault("compare", {})[other] = {"kind": kind, **values}
    return [*rows, *extra.values()]


# The columns the terminal shows of each kind of comparison (the report and --json hold all of them).
_COMPARE_COLUMNS = {
    "change": ("relative_change", "cosine", "sign_agreement", "delta_rank_90"),
    "quantization": ("bits", "group_size", "sqnr_db", "relative_error"),
    "adapter": ("rank", "effective_rank", "frobenius_norm"),
    "task_vectors": ("sign_conflict_rate",),
}
_TEXT_COLUMNS = ("name", "status", "block", "next", "role", "action", "with", "path", "reason")


def _print_table(title: str, rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> None:
    """A terminal table of ``rows``: ``columns`` (default: every scalar column but ``shape``) after ``name``
    and ``status`` when the rows have them, and ``reason`` last when a row has one."""
    present = list(dict.fromkeys(k for row in rows for k in row))
    if columns is None:
        columns = tuple(
            key
            for key in present
            if key != "shape" and not any(isinstance(r.get(key), (list, dict)) for r in rows)
        )
    shown = [c for c in ("name", "status") if c in present]
    shown += [c for c in columns if c in present and c not in (*shown, "reason")]
    # Only why a tensor could not be compared; the notes on compared ones are in the report.
    reasons = [row.get("reason") if row.get("status", "mismatch") == "mismatch" else None for row in rows]
    if any(reasons):
        shown.append("reason")
    table = Table(title=title)
    for column in shown:
        text = column in _TEXT_COLUMNS
        table.add_column(
            column,
            justify="left" if text else "right",
            overflow="fold",
            no_wrap=column not in ("name", "block", "next", "role", "reason"),
            min_width=20 if column == "name" else None,
        )
    for row, reason in zip(rows, reasons, strict=True):
        table.add_row(*(_cell(reason if c == "reason" else row.get(c)) for c in shown))
    results.print(table)


def _summary_line(summary: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {_cell(v) or 'n/a'}" for k, v in summary.items() if not isinstance(v, (list, dict))
    )


def _run_compare(args: argparse.Namespace, sections: list, summary: dict[str, Any]) -> dict[str, Any]:
    """--compare: the tables of :func:`~weightkit.inspect.compare.compare`, their sections and summaries."""
    from weightkit.inspect.compare import compare
    from weightkit.inspect.report import comparison_sections

    tables = compare(args.model, args.compare, density=args.ties_density)
    if args.ties_density is not None and "task_vectors" not in tables:
        full = [name.partition(":")[2] for name in tables if name.startswith("change:")]
        raise WeightkitError(
            f"--ties-density needs two or more full checkpoints among --compare, got {len(full)} "
            f"({', '.join(full) or 'none'}); the others are adapters or quantized copies"
        )
    sections.extend(comparison_sections(tables))
    summary["compare"] = {name: table.summary for name, table in tables.items()}
    return tables


def _run_similarity(args: argparse.Namespace, sections: list, summary: dict[str, Any]) -> None:
    """--similarity: weight similarity, and with --data the activation similarity; their candidates."""
    from weightkit.inspect.report import similarity_sections
    from weightkit.inspect.similarity import layer_similarity, redundant_blocks, weight_similarity

    activations = None
    if args.data is not None:
        activations = layer_similarity(args.model, args.data, device=args.device, progress=not args.json)
    weights = weight_similarity(args.model, allow_pickle=args.allow_pickle)
    candidates = redundant_blocks(activations.rows if activations else (), weights)
    sections.extend(similarity_sections(activations, weights, candidates))
    summary["similarity"] = {"weights": weights, "candidates": candidates}
    if activations is not None:
        summary["similarity"].update(
            activations=activations.rows,
            cka_matrix=activations.cka_matrix.tolist(),
            labels=activations.labels,
            heatmap_tokens=activations.heatmap_tokens,
        )


def _cmd_inspect(args: argparse.Namespace) -> list[dict[str, Any]]:
    # Imported here, not at the top: torch must load after main() sets its OpenMP wait policy.
    from weightkit.inspect.report import check_report_target, inspect_checkpoint, strict_json, write_report

    _check_options(args)
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
    runs_models = args.similarity and args.data is not None
    if runs_models or any(v is not None for v in (args.hessian, args.barrier, args.intrinsic_dim)):
        import transformers

        # These load models: our own progress bars say what is happening (as main() does for other verbs).
        transformers.utils.logging.disable_progress_bar()
    sections: list = []
    summary: dict[str, Any] = {}
    tables = _run_compare(args, sections, summary) if args.compare else {}
    if args.similarity:
        _run_similarity(args, sections, summary)
    if args.hessian is not None or args.barrier is not None or args.intrinsic_dim is not None:
        _run_extras(args, sections, summary)
    rows = _nested_rows(result.json_rows(), tables)
    write_report(
        result, out, sections=sections, overwrite=args.force, rows=rows, json_files={"summary.json": summary}
    )
    if not args.json:
        _print_rows(result.rows)
        for name, table in tables.items():
            _print_table(f"compare {name}", table.rows, _COMPARE_COLUMNS[name.partition(":")[0]])
            results.print(f"{name}: {_summary_line(table.summary)}")
        _print_summaries(summary)
        seconds = time.perf_counter() - start
        results.print(f"report written to [bold]{out}[/bold] ({seconds:.1f} s): open {out / 'report.html'}")
    return strict_json(rows)


def _run_extras(args: argparse.Namespace, sections: list, summary: dict[str, Any]) -> None:
    """--hessian, --barrier, --intrinsic-dim: they train, align or differentiate the model
    (:mod:`weightkit.cli.inspect_extras`, imported here: it loads transformers)."""
    from weightkit.cli.inspect_extras import barrier_run, hessian_run, intrinsic_dimension_run
    from weightkit.inspect.report import barrier_section, hessian_section, intrinsic_dimension_section

    if args.hessian is not None:
        hessian = hessian_run(args.model, args.data, args.hessian, args.device)
        sections.append(hessian_section(hessian))
        summary["hessian"] = hessian
    if args.barrier is not None:
        barrier = barrier_run(args.model, args.barrier, args.data, args.align, args.device)
        sections.append(barrier_section(barrier, args.model, args.barrier))
        summary["barrier"] = {
            "other": args.barrier,
            "before": dataclasses.asdict(barrier["before"]),
            "after": None if barrier["after"] is None else dataclasses.asdict(barrier["after"]),
            "alignment": barrier["alignment"],
        }
    if args.intrinsic_dim is not None:
        found = intrinsic_dimension_run(
            args.model, args.data, dims=args.intrinsic_dim, said=args.said, device=args.device
        )
        sections.append(intrinsic_dimension_section(found))
        summary["intrinsic_dimension"] = {
            **dataclasses.asdict(found["intrinsic"]),
            "subspace": "SAID" if args.said else "DID",
            **{key: found[key] for key in ("metric", "full", "runs", "seconds")},
        }


def _print_summaries(summary: dict[str, Any]) -> None:
    """A few lines per model-level analysis that ran (the tables are in the report)."""
    similarity = summary.get("similarity")
    if similarity is not None:
        if "activations" in similarity:
            _print_table("layer similarity (activations)", similarity["activations"])
        found = similarity["candidates"]
        if found:
            _print_table("redundant blocks", found)
        else:
            results.print("redundant blocks: none found")
    hessian = summary.get("hessian")
    if hessian is not None:
        top = ", ".join(f"{v:.4g}" for v in hessian["eigenvalues"])
        results.print(
            f"Hessian: top eigenvalues {top} (loss {hessian['loss']:.4g}, {hessian['seconds']:.1f} s)"
        )
    barrier = summary.get("barrier")
    if barrier is not None:
        line = f"loss barrier to {barrier['other']}: {barrier['before']['barrier']:.4g}"
        if barrier["after"] is not None:
            line += f", after permutation alignment {barrier['after']['barrier']:.4g}"
        results.print(line)
    intrinsic = summary.get("intrinsic_dimension")
    if intrinsic is not None:
        d90 = intrinsic["d90"] if intrinsic["d90"] is not None else "not reached"
        results.print(
            f"intrinsic dimension ({intrinsic['subspace']}): d90 {d90}; full fine-tune {intrinsic['metric']} "
            f"{intrinsic['full_score']:.6g}, threshold {intrinsic['threshold']:.6g}"
        )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _dims(text: str) -> list[int]:
    try:
        dims = [int(part) for part in text.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, got {text!r}")
    return dims


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
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
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="OTHER",
        help="compare MODEL with each OTHER: a fine-tune, a quantized copy or a LoRA adapter (see below); "
        "streams both checkpoints one tensor at a time, about the time of the metrics themselves per OTHER",
    )
    p.add_argument(
        "--ties-density",
        type=_density,
        metavar="F",
        help="with two or more full checkpoints in --compare: count TIES sign conflicts after trimming each "
        "task vector to its top F share of magnitudes per tensor (default: the raw task vectors)",
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        help="examples for the analyses that run the model: .txt (passages split by blank lines) or "
        ".jsonl/.json with 'text' (and 'label' for a classifier). Used by --similarity (activations), "
        "--hessian, --barrier (default there for a causal LM: Python standard-library docstrings) and "
        "--intrinsic-dim (required); refused without one of them (default: none)",
    )
    p.add_argument(
        "--similarity",
        action="store_true",
        help="layer similarity: cosine of each linear layer's weights with the next block's (streamed, no "
        "data), and with --data the linear CKA and token cosine of consecutive blocks' outputs on 64 "
        "passages (loads and runs the model once; memory (2L+1)d^2 float64 numbers), a CKA heatmap, and "
        "the blocks that are candidates to drop or share. Not implied by --data, which the other analyses "
        "use too: running the model is a cost to ask for",
    )
    p.add_argument(
        "--hessian",
        type=_positive,
        metavar="K",
        help="the K largest eigenvalues of the loss's Hessian (Lanczos, 30 Hessian-vector products) and "
        "its eigenvalue density (stochastic Lanczos quadrature, 4 probes) on 8 examples of --data; a "
        "causal LM or a sequence classifier; memory about 120 bytes per parameter plus a double backward "
        "pass. Results in summary.json under 'hessian'",
    )
    p.add_argument(
        "--barrier",
        metavar="OTHER",
        help="the linear-mode-connectivity loss barrier from MODEL to checkpoint OTHER: the loss at 11 "
        "points on the straight line between their weights, on 32 examples of --data (two models in "
        "memory, 11 evaluations). Results in summary.json under 'barrier'",
    )
    p.add_argument(
        "--align",
        action="store_true",
        help="with --barrier: also the barrier after permuting OTHER's attention heads and MLP neurons to "
        "match MODEL (as weightkit align does; one more aligned copy of OTHER, in a temporary directory)",
    )
    p.add_argument(
        "--intrinsic-dim",
        type=_dims,
        metavar="D1,D2,...",
        help="intrinsic dimension d90: fine-tune the model on --data (one epoch) in a random subspace of "
        "each dimension d listed and fully (the baseline), and report the smallest d reaching 90%% of the "
        "full fine-tune's score (accuracy for a classifier, the held-out loss gain for a causal LM); one "
        "training run per d plus one. Results in summary.json under 'intrinsic_dimension'",
    )
    p.add_argument(
        "--said",
        action="store_true",
        help="with --intrinsic-dim: the SAID subspace (a learned scale per tensor, counted in d) instead "
        "of DID",
    )
    p.set_defaults(run=_cmd_inspect)
    common_options(p, force=True, allow_pickle=True, device=True)
