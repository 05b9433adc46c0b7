"""``weightkit export``: write a compressed checkpoint as an ordinary dense Hugging Face checkpoint."""

import argparse
from pathlib import Path
from typing import Any

from weightkit.cli.common import common_options, mb, print_table, refuse_existing
from weightkit.errors import WeightkitError
from weightkit.progress import results


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    if not args.dense:
        raise WeightkitError(
            "weightkit export expands a compressed checkpoint (low-rank factors, BitStack blocks, shared "
            "weights, quantized layers) into an ordinary dense Hugging Face checkpoint for tools that read "
            "only plain weights; it has one form, --dense: pass it"
        )
    from weightkit.checkpoint import weights_size
    from weightkit.quantized.dense import export_dense

    out = Path(args.output)
    refuse_existing(out, args.force)
    expanded = export_dense(args.model, out, overwrite=args.force, max_shard_bytes=args.max_shard_size)
    before, after = weights_size(args.model), weights_size(out)
    summary = {
        "model": str(args.model),
        "output": str(out),
        "dense_layers": len(expanded),
        "size_before_bytes": before,
        "size_after_bytes": after,
    }
    if not args.json:
        print_table(
            "weightkit export --dense",
            [{"layers made dense": len(expanded), "size before": mb(before), "size after": mb(after)}],
        )
        results.print(f"saved to [bold]{out}[/bold]")
    return summary


def add_parsers(sub) -> None:
    """Add ``export`` to the ``weightkit`` subcommands."""
    e = sub.add_parser(
        "export",
        help="expand a compressed checkpoint (low rank, BitStack, shared weights, quantized) into an "
        "ordinary dense one (--dense)",
        description=(
            "Load a checkpoint weightkit compressed (low-rank factors from --method svd/welore, BitStack "
            "blocks, weights shared by recursive/dictionary/foldgpt, or quantized layers) with "
            "weightkit.load, replace every compressed layer by a plain Linear holding its dense weight in "
            "the model's dtype, and write an ordinary Hugging Face checkpoint (no quantization_config, "
            "tokenizer copied) that transformers and other tools load. The output is as large as the "
            "uncompressed model."
        ),
        epilog="example:\n  weightkit export ./my-model-svd -o ./my-model-svd-dense --dense",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("model", help="a checkpoint directory weightkit compressed")
    e.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    e.add_argument("--dense", action="store_true", help="write dense weights (the one export form)")
    e.set_defaults(run=_cmd_export)
    common_options(e, force=True, max_shard_size=True)
