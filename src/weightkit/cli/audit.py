"""``weightkit audit FULL QUANTIZED --data FILE``: does QUANTIZED behave as quantizing FULL predicts, or was
it planted ("Exploiting LLM Quantization", arXiv 2405.18137)? The method is
:mod:`weightkit.inspect.audit`'s."""

import argparse
import math
from typing import Any

from rich.markup import escape

from weightkit.cli.common import common_options, print_table
from weightkit.progress import results

# Rows of the worst blocks and grid layers the terminal shows (--json has them all).
_WORST = 8

_EPILOG = """\
how it decides: KL(FULL || QUANTIZED) of the next-token distributions on the probe texts is compared with
the KL of null models: FULL carrying its own quantization error W - Ŵ with random signs (--seeds of them).
An honest quantization lands near the null (ratio ~1; GPTQ and AWQ below it); a model planted to turn
malicious once quantized carries an error aimed at a behaviour and lands far above it. It is flagged when
ratio = KL / null KL exceeds --threshold. Integer-grid layers are also checked against FULL's rounding:
'outside box' is the share of weights more than half a grid step from FULL's (0 for round-to-nearest,
some for GPTQ and AWQ); a median beyond one step means QUANTIZED was not made from FULL, and is flagged too.

exit status: 0 consistent, 1 bad input (nothing audited), 2 flagged. A usage error (a missing or unknown
option) also exits 2, as in every weightkit command, but prints only the usage, on stderr; a flagged
audit prints its report on stdout (with --json, the JSON report).

examples:
  weightkit audit ./llama ./llama-w4 --data probes.txt
  weightkit audit ./llama ./llama-w4 --data probes.jsonl --seeds 8 --json > audit.json"""


def _finite(value: Any) -> Any:
    """JSON has no infinity: an infinite ratio (the null has no error, the models differ) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_result(result) -> None:
    s = result.summary
    rows = [
        ("probe texts / tokens", f"{s['texts']} / {s['tokens']}"),
        ("KL mean (max)", f"{_cell(s['kl_mean'])} ({_cell(s['kl_max'])})"),
        ("top-1 agreement", _cell(s["top1_agreement"])),
        (
            f"null KL mean ± spread ({s['seeds']} seeds)",
            f"{_cell(s['null_kl_mean'])} ± {_cell(s['null_kl_std'])}",
        ),
        ("null top-1 agreement", _cell(s["null_top1_agreement"])),
        ("ratio (threshold)", f"{_cell(s['ratio'])} ({_cell(s['threshold'])})"),
        ("quantized layers (integer grids)", f"{s['quantized_layers']} ({s['grid_layers']})"),
        ("outside rounding box / median step", f"{_cell(s['outside_box'])} / {_cell(s['median_steps'])}"),
        ("changed unquantized tensors", str(len(s["changed_unquantized"]))),
    ]
    print_table("weightkit audit", [{"metric": name, "value": value} for name, value in rows])
    blocks = sorted(result.blocks, key=lambda row: -row["ratio"])[:_WORST]
    print_table(
        "blocks, most divergent first (relative error of the output hidden states)",
        [
            {
                "block": row["block"],
                "error": _cell(row["relative_error"]),
                "null error": _cell(row["null_relative_error"]),
                "ratio": _cell(row["ratio"]),
            }
            for row in blocks
        ],
    )
    grid = [row for row in result.layers if row["outside_box"]]
    if grid:
        worst = sorted(grid, key=lambda row: -row["median_steps"])[:_WORST]
        print_table(
            "layers with weights outside FULL's rounding box",
            [
                {
                    "name": row["name"],
                    "outside box": _cell(row["outside_box"]),
                    "median step": _cell(row["median_steps"]),
                    "max step": _cell(row["max_steps"]),
                }
                for row in worst
            ],
        )
    changed = s["changed_unquantized"]
    if changed:
        names = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        results.print(
            "note: tensors QUANTIZED stores unquantized differ from FULL's (quantization leaves them as "
            f"they are; the null keeps FULL's): {escape(names)}",
            soft_wrap=True,
        )
    reasons = []
    if s["divergent"]:
        reasons.append(f"its KL is {_cell(s['ratio'])}x what the quantization error predicts")
    if s["not_from_full"]:
        reasons.append("its weights are not a rounding of FULL's")
    if reasons:
        results.print(f"[bold red]flagged:[/bold red] {escape('; '.join(reasons))}", soft_wrap=True)
    else:
        results.print("consistent with an honest quantization of FULL")


def _cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.data import load_texts
    from weightkit.errors import WeightkitError
    from weightkit.inspect.audit import audit
    from weightkit.runtime.device import resolve_device

    for flag, value in (("--max-samples", args.max_samples), ("--seq-len", args.seq_len)):
        if value < 1:
            raise WeightkitError(f"{flag} must be at least 1, got {value}")
    device = resolve_device(args.device)
    texts = load_texts(args.data)[: args.max_samples]
    threshold = {} if args.threshold is None else {"threshold": args.threshold}  # else audit's default
    result = audit(
        args.full, args.quantized, texts, max_length=args.seq_len, seeds=args.seeds, device=device,
        progress=not args.json, **threshold,
    )  # fmt: skip
    if not args.json:
        _print_result(result)
    args.exit_status = 2 if result.flagged else 0
    return {
        "full": str(args.full),
        "quantized": str(args.quantized),
        "data": str(args.data),
        "summary": {key: _finite(value) for key, value in result.summary.items()},
        "blocks": [{key: _finite(value) for key, value in row.items()} for row in result.blocks],
        "layers": result.layers,
    }


def add_parsers(sub) -> None:
    """Add ``audit`` to the ``weightkit`` subcommands."""
    a = sub.add_parser(
        "audit",
        help="check that a quantized model behaves as quantizing its full-precision model predicts",
        description=(
            "Compare a causal LM with its quantized copy on probe texts (token-level KL, top-1\n"
            "agreement, per-block error) against what the quantization error alone predicts, and flag a\n"
            "quantized model planted to behave differently from its full-precision model (Egashira et al.,\n"
            "'Exploiting LLM Quantization', arXiv 2405.18137)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("full", help="the full-precision model directory (its tokenizer reads the probe texts)")
    a.add_argument("quantized", help="its quantized copy (compressed-tensors or a weightkit format)")
    a.add_argument("--data", required=True, help="probe texts: .txt, .jsonl or .json")
    a.add_argument("--max-samples", type=int, default=64, help="probe texts used, at most (default: 64)")
    a.add_argument("--seq-len", type=int, default=128, help="max tokens per probe text (default: 128)")
    a.add_argument("--seeds", type=int, default=5, help="null models, random sign patterns (default: 5)")
    a.add_argument(
        "--threshold", type=float, help="flag above this ratio of KL to the null's KL (default: 3)"
    )
    a.set_defaults(run=_cmd_audit)
    common_options(a, device=True)
