"""``weightkit compress``: quantize a Hugging Face model directory."""

import argparse
import time
from pathlib import Path
from typing import Any

from weightkit.cli.common import common_options, mb, print_table, refuse_existing
from weightkit.errors import WeightkitError
from weightkit.progress import console

_METHODS = ("rtn", "gptq", "awq")


def _group_size_arg(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a number or 'channel', got {text!r}") from None


def _config_from_args(args: argparse.Namespace):
    """The compress config from ``--recipe`` or from the flags, validated before any model is loaded."""
    from weightkit.recipe import load_config
    from weightkit.registry import config_from_dict

    if args.recipe:
        return load_config(args.recipe, "compress")
    fields: dict[str, Any] = {
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "symmetric": not args.asym,
    }
    if args.method != "rtn":
        fields.update(calib_samples=args.calib_samples, calib_max_length=args.seq_len, seed=args.seed)
    if args.method == "gptq":
        fields["damp"] = args.damp
        if args.act_order is not None:
            fields["act_order"] = args.act_order
    elif args.act_order is not None:
        raise WeightkitError("--act-order/--no-act-order apply to --method gptq only")
    return config_from_dict("compress", fields)


def _cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.checkpoint import weights_size
    from weightkit.compress import compress_checkpoint
    from weightkit.registry import config_to_dict
    from weightkit.runtime.device import resolve_device

    config = _config_from_args(args)
    device = resolve_device(args.device)
    out = Path(args.output)
    refuse_existing(out, args.force)
    start = time.perf_counter()
    compress_checkpoint(
        args.model,
        out,
        config,
        data=args.calib,
        progress=not args.json,
        overwrite=args.force,
        max_shard_bytes=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        device=device,
    )
    seconds = time.perf_counter() - start
    before, after = weights_size(args.model), weights_size(out)
    summary = {
        "model": str(args.model),
        "output": str(out),
        "config": config_to_dict(config),
        "device": str(device),
        "seconds": round(seconds, 2),
        "size_before_bytes": before,
        "size_after_bytes": after,
        "compression_ratio": round(before / after, 2),
    }
    if not args.json:
        print_table(
            "weightkit compress",
            [
                {
                    "method": summary["config"]["method"],
                    "setting": _setting(config),
                    "time (s)": f"{seconds:.1f}",
                    "size before": mb(before),
                    "size after": mb(after),
                    "ratio": f"{before / after:.2f}x",
                }
            ],
        )
        console.print(f"saved to [bold]{out}[/bold]")
    return summary


def _setting(config) -> str:
    group = f"g{config.group_size}" if config.group_size else "per-channel"
    return f"int{config.bits} {'sym' if config.symmetric else 'asym'} {group}"


def add_parsers(sub) -> None:
    """Add ``compress`` to the ``weightkit`` subcommands."""
    c = sub.add_parser(
        "compress",
        help="quantize a Hugging Face model directory to 2-8 bits (RTN, GPTQ, AWQ)",
        description=(
            "Quantize the linear layers of a Hugging Face model (Llama-architecture causal LMs, BERT-style "
            "encoders) and save a compressed-tensors checkpoint that transformers loads. Embeddings, "
            "lm_head and norms stay in full precision."
        ),
        epilog=(
            "examples:\n"
            "  weightkit compress ./my-model -o ./my-model-w4 --method gptq --bits 4 --group-size 128\n"
            "  weightkit compress ./my-model -o ./out --recipe recipe.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model", help="Hugging Face model directory (safetensors)")
    c.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    c.add_argument("--method", choices=_METHODS, default="gptq", help="quantization method (default: gptq)")
    c.add_argument("--bits", type=int, default=4, help="bits per weight, 2-8 (default: 4)")
    c.add_argument(
        "--group-size",
        type=_group_size_arg,
        default=128,
        help="input columns per scale: 32, 64, 128 ... or 'channel' for per-channel (default: 128)",
    )
    c.add_argument(
        "--asym", action="store_true", help="asymmetric grid with a zero point (default: symmetric)"
    )
    c.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQ: quantize the most-activated input columns first (default: on)",
    )
    c.add_argument(
        "--damp", type=float, default=0.01, help="GPTQ: Hessian dampening fraction (default: 0.01)"
    )
    c.add_argument(
        "--calib",
        help="calibration text for GPTQ/AWQ: .txt (passages split by blank lines), .jsonl or .json with a "
        "'text' field (default: docstrings of Python's standard library)",
    )
    c.add_argument("--calib-samples", type=int, default=128, help="calibration texts used (default: 128)")
    c.add_argument("--seq-len", type=int, default=512, help="max tokens per calibration text (default: 512)")
    c.add_argument("--seed", type=int, default=0, help="seed for picking calibration texts (default: 0)")
    c.add_argument("--recipe", help="YAML recipe holding the method config (replaces the method flags)")
    c.set_defaults(run=_cmd_compress)
    common_options(c, force=True, max_shard_size=True, allow_pickle=True, device=True)
