"""``weightkit compress MODEL -o OUT --sweep PARAM=V1,V2,...``: size against quality over a grid of settings.

Each point of the grid (every ``--method`` given, times every value of the swept option) is compressed
into ``OUT/<method>-<param>=<value>/``, an ordinary compressed checkpoint written atomically by
:func:`weightkit.compress.compress_checkpoint`, and evaluated as ``weightkit eval`` evaluates it:
perplexity on held-out text for a causal LM, the mean cosine of sentence embeddings against the
full-precision model for an encoder. The full-precision model is the reference point. ``OUT/sweep.json``
and ``OUT/sweep.csv`` are rewritten after each point (so an interrupted sweep describes the points it
finished), ``OUT/sweep.png`` (size on x, quality on y, one line per method) at the end.

Every config of the grid is built, and so validated, before anything is loaded or written: a bad option,
value or combination stops the whole sweep with one message naming the method, option and value.

The default evaluation text is the held-out split of the default calibration corpus,
``weightkit.data.stdlib_docstrings("eval")``: its modules are disjoint from the calibration split's, and
no passage is in both. Whatever the sources, a sweep that calibrates refuses evaluation text that shares
a passage with its calibration text, which would flatter the calibrated methods.
"""

import argparse
import csv
import dataclasses
import io
import json
import math
import time
import types
import typing
from pathlib import Path
from typing import Any

from rich.markup import escape

from weightkit.cli.common import mb, name_flag, print_table, refuse_existing
from weightkit.errors import WeightkitError
from weightkit.progress import console, results

__all__ = ["add_sweep_options", "refuse_sweep_options", "run_sweep", "parse_sweep", "sweep_configs"]

# The method a sweep compresses with when --method is not given (as `weightkit compress` without --sweep).
_DEFAULT_METHOD = "gptq"
_REFERENCE = "full precision"
# What each evaluation measures, and which way is better.
_METRICS = {"causal-lm": ("perplexity", False), "encoder": ("embedding_fidelity", True)}
_MAX_EVAL_TEXTS = 256
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--sweep``, ``--eval-data`` and ``--max-eval-texts`` to ``weightkit compress``."""
    group = parser.add_argument_group("sweep (size against quality)")
    group.add_argument(
        "--sweep",
        metavar="OPTION=V1,V2,...",
        help="compress once per value of one method option (e.g. bits=2,3,4,8, group_size=32,64,128; "
        "none for an optional one: group_size=none is per-channel) and per --method (a comma list: "
        "--method rtn,gptq), into OUTPUT/<method>-<option>=<value>/; evaluate each (perplexity for causal "
        "LMs, embedding fidelity for encoders) against the full-precision model and write "
        "OUTPUT/sweep.json, sweep.csv and sweep.png (size against quality). Method flags given with it "
        "apply to every point of the methods that take them",
    )
    group.add_argument(
        "--eval-data",
        help="--sweep: evaluation text, .txt, .jsonl or .json (default: docstrings of the standard-library "
        "modules held out from the default calibration text)",
    )
    group.add_argument(
        "--max-eval-texts",
        type=int,
        help=f"--sweep: evaluate on at most this many texts (default: {_MAX_EVAL_TEXTS}, as weightkit eval)",
    )


def refuse_sweep_options(args: argparse.Namespace) -> None:
    """Without ``--sweep``: refuse a comma list of methods and the sweep's own options, by name."""
    if "," in getattr(args, "method", ""):
        raise WeightkitError(
            f"--method {args.method}: several methods compress one model only in a sweep; add --sweep "
            "OPTION=V1,V2,... or give one method"
        )
    for option in ("eval_data", "max_eval_texts"):
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise WeightkitError(f"{flag} applies to --sweep only (to evaluate each point)")


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``"bits=2,3,4"`` -> ``("bits", ["2", "3", "4"])``: the option and its values as typed."""
    param, sep, values = text.partition("=")
    param = param.strip().replace("-", "_")  # --sweep group-size=... reads like the flag
    raw = [value.strip() for value in values.split(",")]
    if not sep or not param or not all(raw):
        raise WeightkitError(f"--sweep {text!r}: expected OPTION=V1,V2,... such as bits=2,3,4,8")
    if param == "method":
        raise WeightkitError("--sweep method=...: give the methods to compare as --method rtn,gptq instead")
    return param, raw


def _parse_value(text: str, hint: Any) -> Any:
    """``text`` as a value of a config field annotated ``hint`` (``int``, ``float``, ``bool``, ``str`` or one
    of them ``| None``); ``ValueError`` when it is not one."""
    members = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in members
    others = [member for member in members if member is not type(None)]
    base = others[0] if optional and len(others) == 1 else hint
    if optional and text.lower() == "none":
        return None
    if base is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError("expected true or false")
        return text.lower() in _TRUE
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer" + (" or none" if optional else "")) from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number" + (" or none" if optional else "")) from None
    if base is str:
        return text
    raise ValueError("only options holding one number, true/false or word can be swept")


def _value_label(value: Any) -> str:
    """How a swept value is written in a point's directory name and in tables: ``4``, ``0.01``, ``none``."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: a method's config with the swept option set to ``value``.

    Attributes:
        method: The registered compress method.
        value: The swept option's value, as the config holds it.
        config: The validated config.
    """

    method: str
    value: Any
    config: Any

    def name(self, param: str) -> str:
        """The point's directory name under the sweep's output: ``rtn-bits=4``."""
        return f"{self.method}-{param}={_value_label(self.value)}"


def sweep_configs(
    methods: list[str], param: str, values: list[str], fixed: dict[str, dict[str, Any]]
) -> list[SweepPoint]:
    """Every point of the grid, methods outer, values inner, each config built and validated.

    Args:
        methods: Registered compress methods.
        param: The swept config field.
        values: Its values as typed; each is parsed to the field's type in each method's config.
        fixed: Per method, the other config fields to set at every point.

    Returns:
        The points.

    Raises:
        WeightkitError: The first problem found, naming the method, the option and the value: an unknown
            method, an option the method does not have or that cannot be swept, a value of the wrong type
            or one the method refuses, or a value listed twice.
    """
    from weightkit.registry import config_from_dict, lookup

    points = []
    for method in methods:
        entry = lookup("compress", method)
        fields = [field.name for field in dataclasses.fields(entry.config_cls)]
        if param not in fields:
            raise WeightkitError(
                f"--sweep {param}=...: --method {method} has no option {param!r}; its options: "
                f"{', '.join(fields)}"
            )
        hint = typing.get_type_hints(entry.config_cls)[param]
        seen: dict[Any, str] = {}
        for text in values:
            try:
                value = _parse_value(text, hint)
            except ValueError as err:
                raise WeightkitError(f"--sweep {param}={text} with --method {method}: {err}") from None
            if value in seen:
                raise WeightkitError(
                    f"--sweep {param}: {text} and {seen[value]} are the same value; list each value once"
                )
            seen[value] = text
            try:
                config = config_from_dict("compress", {"method": method, **fixed[method], param: value})
            except WeightkitError as err:
                why = str(err).removeprefix(f"{method}: ")  # the registry's prefix, said once here
                raise WeightkitError(f"--sweep {param}={text} with --method {method}: {why}") from None
            points.append(SweepPoint(method, value, config))
    return points


def _fixed_fields(args: argparse.Namespace, methods: list[str], param: str, flags: dict) -> dict:
    """Per method, the config fields the method flags set (``flags`` is ``weightkit compress``'s table:
    argparse dest -> (config field, methods that take it, flag)). A flag applies to the methods that take
    it and must apply to one of them at least; a flag setting the swept option is refused."""
    fixed: dict[str, dict[str, Any]] = {method: {} for method in methods}
    for dest, (field, takers, flag) in flags.items():
        if dest == "method" or not hasattr(args, dest):
            continue
        if field == param:
            raise WeightkitError(
                f"{flag} conflicts with --sweep {param}=...: the sweep sets {param} at each point; leave "
                f"{flag} out"
            )
        applies = [method for method in methods if method in takers]
        if not applies:
            raise WeightkitError(
                f"{flag} applies to --method {' or '.join(takers)} only, not {', '.join(methods)}"
            )
        value = getattr(args, dest)
        for method in applies:
            fixed[method][field] = not value if dest == "asym" else value  # --asym sets symmetric=False
    return fixed


def _uses_calibration(config: Any) -> bool:
    # Every method that reads calibration text has CalibrationFields (calib_samples ...).
    return hasattr(config, "calib_samples")


def _eval_texts(args: argparse.Namespace, calibrates: bool) -> tuple[list[str], str]:
    """The evaluation passages and where they come from; refused when they share a passage with the
    calibration source (all of it, not only the passages a method samples)."""
    from weightkit.data import load_texts, stdlib_docstrings

    max_texts = _MAX_EVAL_TEXTS if args.max_eval_texts is None else args.max_eval_texts
    if max_texts < 1:
        raise WeightkitError(f"--max-eval-texts must be at least 1, got {max_texts}")
    if args.eval_data is not None:
        texts, source = load_texts(args.eval_data), str(args.eval_data)
    else:
        texts, source = stdlib_docstrings("eval"), "standard-library docstrings (held-out modules)"
    texts = texts[:max_texts]
    if calibrates:
        calibration = load_texts(args.calib) if args.calib is not None else stdlib_docstrings("calib")
        shared = set(texts) & set(calibration)
        if shared:
            where = args.calib or "the default calibration text"
            raise WeightkitError(
                f"{len(shared)} of the {len(texts)} evaluation passages ({source}) are also in the "
                f"calibration text ({where}): the calibrated methods would be scored on text they were "
                "fitted to. Pass --eval-data with held-out text"
            )
    return texts, source


def quantized_layer_bytes(
    source: str | Path, compressed: str | Path, *, allow_pickle: bool = False
) -> tuple[int, int, int]:
    """What the weights a compressed checkpoint changed occupy, from the two checkpoints' headers.

    A module ``M`` counts as compressed when the output stores tensors named ``M.weight_*`` (packed
    values, scales, zero points, codebooks, outlier indices ...) or a ``M.weight`` of another dtype or
    shape than the source's. Biases are left out.

    Returns:
        ``(stored_bytes, source_bytes, weights)``: the bytes of the compressed modules' weight tensors in
        the output and in the source, and how many weights they hold (0 when nothing was compressed).
    """
    from weightkit.checkpoint import CheckpointReader

    stored = source_bytes = weights = 0
    with CheckpointReader(source, allow_pickle=allow_pickle) as src, CheckpointReader(compressed) as out:
        by_module: dict[str, list[str]] = {}
        for name in out.names():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" or leaf.startswith("weight_"):
                by_module.setdefault(module, []).append(name)
        for module, names in by_module.items():
            weight = f"{module}.weight"
            if weight not in src:
                continue
            same = names == [weight] and (out.dtype(weight), out.shape(weight)) == (
                src.dtype(weight),
                src.shape(weight),
            )
            if same:
                continue
            count = math.prod(src.shape(weight))
            weights += count
            source_bytes += count * src.dtype(weight).itemsize
            stored += sum(math.prod(out.shape(name)) * out.dtype(name).itemsize for name in names)
    return stored, source_bytes, weights


class _Evaluator:
    """Scores models of one kind on fixed texts as ``weightkit eval`` does: perplexity, or the embedding
    fidelity against the first model scored (the full-precision reference), whose embeddings are kept."""

    def __init__(self, kind: str, texts: list[str], device):
        self.kind, self.texts, self.device = kind, texts, device
        self.metric, self.higher_is_better = _METRICS[kind]
        self.reference_embeddings = None

    def score(self, model, tokenizer) -> float:
        from weightkit.eval import perplexity, sentence_embeddings
        from weightkit.eval.embedding import mean_cosine

        model.to(self.device)
        if self.kind == "causal-lm":
            return perplexity(model, tokenizer, self.texts)
        embeddings = sentence_embeddings(model, tokenizer, self.texts)
        if self.reference_embeddings is None:
            self.reference_embeddings = embeddings
        return mean_cosine(self.reference_embeddings, embeddings)


def _check_model(path: str, allow_pickle: bool) -> str:
    """The model's task (causal-lm or encoder), refusing what a sweep cannot evaluate, before any work."""
    from weightkit.arch import model_task
    from weightkit.checkpoint import CheckpointReader
    from weightkit.models import has_tokenizer
    from weightkit.quantized.compressed_tensors import refuse_quantized

    refuse_quantized(
        path, verb="weightkit compress", instead="compress the full-precision model it was made from"
    )
    with CheckpointReader(path, allow_pickle=allow_pickle) as reader:  # validates the weight files too
        if reader.config is None:
            raise WeightkitError(f"{path} has no config.json: it is not a Hugging Face model directory")
        kind = model_task(reader.config)
    if kind not in _METRICS:
        raise WeightkitError(
            f"{path} is a {kind} model; --sweep evaluates causal LMs (perplexity) and text encoders "
            "(embedding fidelity) only"
        )
    if not has_tokenizer(Path(path)):
        raise WeightkitError(f"{path} has no tokenizer files; --sweep evaluates each point on text with it")
    return kind


def _check_layers(path: str, kind: str, points: list[SweepPoint]) -> None:
    """Every point's layer selection and shapes against the model, built on the meta device (no weight is
    read), so a setting some layer cannot take (a group size that does not divide it, a codebook larger
    than it) stops the sweep before any point is written, not when its turn comes."""
    import warnings

    from weightkit.compress.quant.module import selected_linears
    from weightkit.models import model_auto_class, skeleton

    model = skeleton(Path(path), model_auto_class(kind))
    with warnings.catch_warnings():  # what selected_linears warns about, compress says again per point
        warnings.simplefilter("ignore")
        for point in points:
            try:
                selected_linears(model, point.config)
            except WeightkitError as err:
                raise WeightkitError(
                    f"--method {point.method} at {_value_label(point.value)}: {err}"
                ) from None


def run_sweep(args: argparse.Namespace, flags: dict) -> dict[str, Any]:
    """``weightkit compress ... --sweep``: validate the whole grid, then compress and evaluate each point.

    Args:
        args: ``weightkit compress``'s parsed arguments.
        flags: its method-flag table (argparse dest -> (config field, methods that take it, flag)).

    Returns:
        The summary written to ``OUT/sweep.json``.
    """
    from weightkit.checkpoint import weights_size
    from weightkit.checkpoint.writer import check_target
    from weightkit.models import load_model
    from weightkit.runtime.device import resolve_device

    if args.recipe:
        raise WeightkitError(
            "--recipe with --sweep: a recipe fixes one method config, a sweep builds one per point; give "
            "--method and the method flags instead"
        )
    param, values = parse_sweep(args.sweep)
    methods = [name.strip() for name in getattr(args, "method", _DEFAULT_METHOD).split(",")]
    if len(set(methods)) < len(methods):
        raise WeightkitError(f"--method {args.method}: a method is listed twice")
    fixed = _fixed_fields(args, methods, param, flags)
    try:
        points = sweep_configs(methods, param, values, fixed)
    except WeightkitError as err:  # say the flag the user typed, not the config field behind it
        message = str(err)
        for dest, (field, _, flag) in flags.items():
            if hasattr(args, dest) and dest not in ("method", "asym"):  # --asym sets the opposite field
                message = name_flag(message, field, flag)
        raise WeightkitError(message) from None
    calibrates = any(_uses_calibration(point.config) for point in points)
    if args.calib is not None and not calibrates:
        raise WeightkitError(f"--calib applies to methods that calibrate; {', '.join(methods)} use no data")
    kind = _check_model(args.model, args.allow_pickle)
    texts, text_source = _eval_texts(args, calibrates)
    _check_layers(args.model, kind, points)
    device = resolve_device(args.device)
    out = Path(args.output)
    refuse_existing(out, args.force)
    if out.exists() and not out.is_dir():
        raise WeightkitError(f"{out} exists and is not a directory; refusing to replace it")
    for point in points:  # every point's directory can be written (with --force: replaced) before any work
        check_target(out / point.name(param), overwrite=args.force)

    evaluator = _Evaluator(kind, texts, device)
    metric = evaluator.metric
    start = time.perf_counter()
    reference, tokenizer, _ = load_model(args.model, allow_pickle=args.allow_pickle)
    quality = evaluator.score(reference, tokenizer)
    del reference
    summary: dict[str, Any] = {
        "model": str(args.model),
        "output": str(out),
        "kind": kind,
        "metric": metric,
        "higher_is_better": evaluator.higher_is_better,
        "parameter": param,
        "methods": methods,
        "eval_texts": {"source": text_source, "count": len(texts)},
        "device": str(device),
        "reference": {
            "method": _REFERENCE,
            "path": str(args.model),
            "size_bytes": weights_size(args.model),
            "bits_per_weight": None,
            metric: quality,
            "eval_seconds": round(time.perf_counter() - start, 3),
        },
        "points": [],
        "complete": False,
    }
    if not args.json:
        console.print(escape(f"{_REFERENCE}: {metric} {quality:.4f} on {len(texts)} texts ({text_source})"))
    created = not out.exists()
    try:
        for number, point in enumerate(points, start=1):
            row, source_bits = _run_point(args, point, out / point.name(param), evaluator, device)
            summary["points"].append(row)
            if summary["reference"]["bits_per_weight"] is None:  # the same layers, before compression
                summary["reference"]["bits_per_weight"] = source_bits
            _write_tables(out, summary)
            if not args.json:
                console.print(
                    escape(
                        f"[{number}/{len(points)}] {point.method} {param}={_value_label(point.value)}: "
                        f"{mb(row['size_bytes'])}, {metric} {row[metric]:.4f} "
                        f"(compress {row['compress_seconds']:.1f} s, evaluate {row['eval_seconds']:.1f} s)"
                    ),
                    highlight=False,
                )
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the first point failed: leave nothing behind
        raise
    summary["complete"] = True
    _write_tables(out, summary)
    _write_png(out / "sweep.png", summary)
    if not args.json:
        _print_summary(summary)
    return summary


def _run_point(
    args: argparse.Namespace, point: SweepPoint, path: Path, evaluator: _Evaluator, device
) -> tuple[dict[str, Any], float | None]:
    """Compress and evaluate one point: its row of the summary, and the bits per weight the layers it
    compressed have in the source."""
    from weightkit.checkpoint import weights_size
    from weightkit.compress import compress_checkpoint
    from weightkit.models import load_model
    from weightkit.registry import config_to_dict

    start = time.perf_counter()
    compress_checkpoint(
        args.model,
        path,
        point.config,
        data=args.calib,
        progress=not args.json,
        overwrite=args.force,
        max_shard_bytes=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        device=device,
    )
    compress_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer, _ = load_model(path)
    quality = evaluator.score(model, tokenizer)
    eval_seconds = time.perf_counter() - start
    stored, source_bytes, weights = quantized_layer_bytes(args.model, path, allow_pickle=args.allow_pickle)
    row = {
        "method": point.method,
        "value": point.value,
        "path": str(path),
        "size_bytes": weights_size(path),
        "bits_per_weight": round(8 * stored / weights, 4) if weights else None,
        evaluator.metric: quality,
        "compress_seconds": round(compress_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "config": config_to_dict(point.config),
    }
    return row, round(8 * source_bytes / weights, 4) if weights else None


def sweep_csv(summary: dict[str, Any]) -> str:
    """The summary as CSV: the reference row, then one row per point (the swept option's value under its
    own name; empty cells where a value does not apply)."""
    metric = summary["metric"]
    columns = ["method", summary["parameter"], "path", "size_bytes", "bits_per_weight", metric]
    columns += ["compress_seconds", "eval_seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in [summary["reference"], *summary["points"]]:
        cells = {**row, summary["parameter"]: _value_label(row["value"]) if "value" in row else None}
        writer.writerow(["" if cells.get(column) is None else cells[column] for column in columns])
    return buffer.getvalue()


def _write_tables(out: Path, summary: dict[str, Any]) -> None:
    """``sweep.json`` and ``sweep.csv``, each replaced atomically (the output was checked before the sweep
    began: new, or replaced under --force)."""
    from weightkit.checkpoint.writer import atomic_file

    for name, text in (
        ("sweep.json", json.dumps(summary, indent=2) + "\n"),
        ("sweep.csv", sweep_csv(summary)),
    ):
        with atomic_file(out / name, overwrite=True) as tmp:
            tmp.write_text(text, encoding="utf-8")


def sweep_png(summary: dict[str, Any]) -> bytes:
    """Size (MB) on x against quality on y: one line per method through its points (labelled with the
    swept value), the full-precision model as a star and a dashed horizontal line. Perplexity on a log scale
    when it spans more than a factor 10 (it can grow by orders of magnitude at low bits). The PNG's bytes
    depend on the numbers alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, param = summary["metric"], summary["parameter"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in summary["methods"]:
        rows = sorted((r for r in summary["points"] if r["method"] == method), key=lambda r: r["size_bytes"])
        sizes = [r["size_bytes"] / 1e6 for r in rows]
        line = ax.plot(sizes, [r[metric] for r in rows], marker="o", label=method)[0]
        for row, size in zip(rows, sizes, strict=True):
            ax.annotate(
                f"{param}={_value_label(row['value'])}", (size, row[metric]), textcoords="offset points",
                xytext=(4, 4), fontsize=7, color=line.get_color(),
            )  # fmt: skip
    reference = summary["reference"]
    ax.axhline(reference[metric], color="gray", linestyle="--", linewidth=1)
    ax.plot([reference["size_bytes"] / 1e6], [reference[metric]], marker="*", markersize=12, color="black",
            linestyle="none", label=_REFERENCE)  # fmt: skip
    qualities = [row[metric] for row in [reference, *summary["points"]]]
    if metric == "perplexity" and max(qualities) > 10 * min(qualities):
        ax.set_yscale("log")
    ax.set_xlabel("size of the weights (MB)")
    ax.set_ylabel(
        f"{metric.replace('_', ' ')} ({'higher' if summary['higher_is_better'] else 'lower'} is better)"
    )
    ax.set_title(f"{Path(summary['model']).name}: {param} sweep", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _write_png(path: Path, summary: dict[str, Any]) -> None:
    from weightkit.checkpoint.writer import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_bytes(sweep_png(summary))


def _print_summary(summary: dict[str, Any]) -> None:
    metric, param = summary["metric"], summary["parameter"]
    rows = []
    for row in [summary["reference"], *summary["points"]]:
        bits = row.get("bits_per_weight")
        rows.append(
            {
                "method": row["method"],
                param: _value_label(row["value"]) if "value" in row else "",
                "size": mb(row["size_bytes"]),
                "bits/weight": "" if bits is None else f"{bits:.2f}",
                metric.replace("_", " "): f"{row[metric]:.4f}",
                "time (s)": f"{row['compress_seconds']:.1f}" if "compress_seconds" in row else "",
            }
        )
    print_table(f"weightkit compress --sweep {param}", rows)
    output = escape(summary["output"])
    results.print(f"saved to [bold]{output}[/bold]: a directory per point, sweep.json, sweep.csv, sweep.png")
