"""``weightkit compress``: quantize, prune, factor or share the weights of a Hugging Face model directory."""

import argparse
import functools
import time
from pathlib import Path
from typing import Any

from weightkit.cli import compress_sweep
from weightkit.cli.common import common_options, mb, name_flag, print_table, refuse_existing
from weightkit.errors import WeightkitError
from weightkit.progress import results

_INT_METHODS = ("rtn", "gptq", "awq", "gwq", "flexround")
_QUANT_METHODS = (*_INT_METHODS, "fp8", "fp4", "ternary", "vptq")
_LOW_RANK = ("svd", "welore", "bitstack")
# Weight sharing across blocks (no grid: --bits and --group-size do not apply).
_SHARE_METHODS = ("recursive", "dictionary", "foldgpt")
_PRUNE_METHODS = ("magnitude", "random", "wanda", "sparsegpt")
_METHODS = (*_QUANT_METHODS, *_PRUNE_METHODS, *_LOW_RANK, *_SHARE_METHODS)
# Methods that use no calibration data.
_DATA_FREE = (
    "rtn",
    "fp8",
    "fp4",
    "ternary",
    "magnitude",
    "random",
    "svd",
    "welore",
    "recursive",
    "dictionary",
)
_CALIBRATED = tuple(m for m in _METHODS if m not in _DATA_FREE)


def _methods_arg(text: str) -> str:
    """One method, or (with --sweep) a comma list of them."""
    for name in text.split(","):
        if name.strip() not in _METHODS:
            raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(_METHODS)})")
    return text


def _group_size_arg(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a number or 'channel', got {text!r}") from None


def _bits_arg(text: str) -> int | float:
    """A whole number as an ``int`` (the integer grids' bits), anything else as a ``float`` (VPTQ's index
    bits per weight may be fractional; an integer method refuses it by name)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def _sparsity_arg(text: str) -> float | str:
    """A fraction as a ``float``, anything else (``2:4``) as given; the config validates both by name."""
    try:
        return float(text)
    except ValueError:
        return text


# Method flags: argparse dest -> (config field, the methods that take it, the flag as typed). They
# default to "not given" (argparse.SUPPRESS), so the config's own defaults apply and a flag that the
# method or a --recipe would not use is refused by name instead of ignored.
_FLAGS = {
    "method": ("method", _METHODS, "--method"),
    "bits": ("bits", (*_INT_METHODS, "vptq"), "--bits"),
    "group_size": ("group_size", tuple(m for m in _QUANT_METHODS if m != "vptq"), "--group-size"),
    "asym": ("symmetric", _INT_METHODS, "--asym"),
    "fp8_format": ("fp8_format", ("fp8",), "--fp8-format"),
    "power_of_two": ("power_of_two", ("fp8",), "--power-of-two"),
    "threshold": ("threshold", ("ternary", "welore"), "--threshold"),
    "ratio": ("ratio", ("svd",), "--ratio"),
    "rank_reduction": ("rank_reduction", ("welore",), "--rank-reduction"),
    "min_ratio": ("min_ratio", ("welore",), "--min-ratio"),
    "act_order": ("act_order", ("gptq", "vptq"), "--act-order/--no-act-order"),
    "damp": ("damp", ("gptq", "vptq", "sparsegpt"), "--damp"),
    "sparsity": ("sparsity", _PRUNE_METHODS, "--sparsity"),
    "hessian_shrinkage": ("hessian_shrinkage", ("gptq",), "--hessian-shrinkage/--no-hessian-shrinkage"),
    "duo_scaling": ("duo_scaling", ("awq",), "--duo-scaling/--no-duo-scaling"),
    "vector_length": ("vector_length", ("vptq",), "--vector-length"),
    "residual_bits": ("residual_bits", ("vptq",), "--residual-bits"),
    "kmeans_iterations": ("kmeans_iterations", ("vptq",), "--kmeans-iterations"),
    "outlier_fraction": ("outlier_fraction", ("gwq",), "--outlier-fraction"),
    "steps": ("steps", ("flexround", "foldgpt"), "--steps"),
    "lr": ("lr", ("flexround", "foldgpt"), "--lr"),
    "blocks": ("blocks", ("recursive",), "--blocks"),
    "init": ("init", ("recursive",), "--init"),
    "relax_rank": ("relax_rank", ("recursive",), "--relax-rank"),
    "atoms": ("atoms", ("dictionary",), "--atoms"),
    "drop": ("drop", ("foldgpt",), "--drop"),
    "share": ("share", ("foldgpt",), "--share"),
    "budget_mb": ("budget_mb", ("bitstack",), "--budget-mb"),
    "iterations": ("iterations", ("bitstack",), "--iterations"),
    "rank": ("rank", ("bitstack",), "--rank"),
    "importance": ("importance", ("bitstack",), "--importance"),
    "calib_samples": ("calib_samples", _CALIBRATED, "--calib-samples"),
    "seq_len": ("calib_max_length", _CALIBRATED, "--seq-len"),
    "seed": ("seed", (*_CALIBRATED, "random"), "--seed"),
}


def _config_from_args(args: argparse.Namespace):
    """The compress config from ``--recipe`` or from the flags, validated before any model is loaded."""
    from weightkit.recipe import load_config
    from weightkit.registry import config_from_dict, config_to_dict

    given = {dest: getattr(args, dest) for dest in _FLAGS if hasattr(args, dest)}
    if args.recipe:
        if given:
            flags = ", ".join(_FLAGS[dest][2] for dest in given)
            raise WeightkitError(f"--recipe holds the whole method config: put {flags} in the recipe instead")
        config = load_config(args.recipe, "compress")
    else:
        method = given.pop("method", "gptq")
        fields: dict[str, Any] = {"method": method}
        for dest, value in given.items():
            field, methods, flag = _FLAGS[dest]
            if method not in methods:
                raise WeightkitError(f"{flag} applies to --method {' or '.join(methods)} only, not {method}")
            fields[field] = not value if dest == "asym" else value
        try:
            config = config_from_dict("compress", fields)
        except WeightkitError as err:  # say the flag the user typed, not the config field behind it
            message = str(err)
            for dest in given.keys() - {"asym"}:  # --asym sets the opposite of its field: no rewording
                field, _, flag = _FLAGS[dest]
                message = name_flag(message, field, flag)
            raise WeightkitError(message) from None
    stages = config if isinstance(config, list) else [config]
    methods = [config_to_dict(c)["method"] for c in stages]
    if args.calib is not None and all(method in _DATA_FREE for method in methods):
        raise WeightkitError(
            f"--calib applies to --method {', '.join(_CALIBRATED)} only; {' + '.join(methods).upper()} uses "
            "no calibration data"
        )
    return config


def _cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.checkpoint import weights_size
    from weightkit.compress import compress_checkpoint
    from weightkit.registry import config_to_dict
    from weightkit.runtime.device import resolve_device

    if args.sweep is not None:
        if args.resume:
            raise WeightkitError("--resume continues one interrupted run; it cannot be used with --sweep")
        swept = [m.strip() for m in getattr(args, "method", "").split(",")]
        structural = [m for m in swept if m and m not in _QUANT_METHODS]
        if structural:  # the sweep checks each point's quantization grid against the model before it starts
            raise WeightkitError(
                f"--sweep compares quantization methods; --method {structural[0]} cannot be swept: run it "
                "once per setting instead"
            )
        return compress_sweep.run_sweep(args, _FLAGS)
    compress_sweep.refuse_sweep_options(args)
    config = _config_from_args(args)
    if isinstance(config, list):  # recipe stages, as they run (the summary shows GPTQ's keep_zeros)
        from weightkit.compress.prune.stages import stages_as_run

        config = stages_as_run(config)
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
        resume=args.resume,
    )
    seconds = time.perf_counter() - start
    before, after = weights_size(args.model), weights_size(out)
    summary = {
        "model": str(args.model),
        "output": str(out),
        "config": [config_to_dict(c) for c in config] if isinstance(config, list) else config_to_dict(config),
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
                    "method": _method_name(summary["config"]),
                    "setting": _setting(config),
                    "time (s)": f"{seconds:.1f}",
                    "size before": mb(before),
                    "size after": mb(after),
                    "ratio": f"{before / after:.2f}x",
                }
            ],
        )
        results.print(f"saved to [bold]{out}[/bold]")
    return summary


def _method_name(config: dict | list[dict]) -> str:
    return " + ".join(c["method"] for c in config) if isinstance(config, list) else config["method"]


def _setting(config) -> str:
    if hasattr(config, "iterations"):
        budget = "" if config.budget_mb is None else f", stored within {config.budget_mb:g} MB"
        blocks = f"{config.iterations} blocks of rank {config.rank}, {config.importance} importance"
        return f"bitstack {blocks}{budget}"
    if hasattr(config, "blocks"):
        relaxed = f", LoRA rank {config.relax_rank} per layer" if config.relax_rank else ""
        return f"recursive {config.blocks} shared layers, {config.init_method} init{relaxed}"
    if hasattr(config, "ratio"):
        return f"svd, {config.ratio:.0%} of the selected weights' parameters kept"
    if hasattr(config, "min_ratio"):
        from weightkit.linalg import WELORE_THRESHOLD

        target = (
            f"rank reduction {config.rank_reduction:g}"
            if config.rank_reduction is not None
            else f"threshold {WELORE_THRESHOLD if config.threshold is None else config.threshold:g}"
        )
        return f"welore {target}, LRC above {config.min_ratio:g} of a matrix's rank"
    if hasattr(config, "atoms"):
        return f"dictionary {config.atoms} atoms for {','.join(config.projections)}"
    if hasattr(config, "share"):
        gates = f", gates {config.steps} steps lr {config.lr:g}" if config.share > 1 else ""
        return f"foldgpt drop {config.drop} blocks, share groups of {config.share}{gates}"
    if isinstance(config, list):  # recipe stages
        return " + ".join(_setting(c) for c in config)
    if hasattr(config, "sparsity"):
        return (
            f"{config.sparsity} sparse"
            if isinstance(config.sparsity, str)
            else f"{config.sparsity:.0%} sparse"
        )
    if hasattr(config, "vector_length"):
        v = f"v{config.vector_length}" if config.vector_length else "v per layer"
        residual = f", {config.residual_bits:g} in a residual codebook" if config.residual_bits else ""
        return f"vptq {config.bits:g} index bits/weight{residual}, {v}"
    group = f"g{config.group_size}" if config.group_size else "per-channel"
    if hasattr(config, "outlier_fraction"):
        grid = f"int{config.bits} {'sym' if config.symmetric else 'asym'} {group}"
        return f"gwq {grid} + {config.outlier_fraction:.2%} fp16 outliers"
    if hasattr(config, "fp8_format"):
        pow2 = f" pow2-{config.power_of_two}" if config.power_of_two else ""
        return f"fp8 {config.fp8_format} {group}{pow2}"
    if hasattr(config, "threshold"):
        return f"ternary {group} threshold {config.threshold:g}"
    if not hasattr(config, "bits"):
        return f"fp4 e2m1 {group} (nvfp4)"
    grid = f"int{config.bits} {'sym' if config.symmetric else 'asym'} {group}"
    if hasattr(config, "steps"):
        return f"{grid} flexround {config.steps} steps lr {config.lr:g}"
    return grid


def add_parsers(sub) -> None:
    """Add ``compress`` to the ``weightkit`` subcommands."""
    c = sub.add_parser(
        "compress",
        help="quantize a Hugging Face model directory to 2-8 bits (RTN, GPTQ, AWQ, GWQ, FlexRound), FP8/FP4, "
        "ternary or VPTQ codebooks, prune it (magnitude, random, Wanda, SparseGPT), factor it (SVD, WeLore, "
        "BitStack) or share weights across its layers (recursive, dictionary, FoldGPT)",
        description=(
            "Quantize the linear layers of a Hugging Face model (causal LMs, encoders, T5, ViT; see the "
            "README's Architectures table) and save a compressed-tensors checkpoint that transformers loads. "
            "Embeddings, "
            "lm_head and norms stay in full precision. VPTQ (vector codebooks) and GWQ (a grid plus 16-bit "
            "outliers) have no compressed-tensors format: they are saved in weightkit's, which "
            "weightkit.load reads and transformers refuses. GWQ takes gradients of the whole model, so it "
            "loads it whole (causal LMs only); the other quantization methods stream it. SVD and WeLore "
            "replace linear layers by two low-rank factors (streamed in two passes); BitStack stores each "
            "layer as ~1-bit residual blocks in one order, which weightkit.load reads at any memory budget. "
            "recursive ties the "
            "layers into K shared ones looped over the depth (optionally with a LoRA per layer), reading one "
            "linear of every layer at a time; dictionary (MASA) writes each attention projection type as "
            "combinations of a few atoms shared by all blocks; foldgpt removes the blocks whose output is "
            "most like their input and shares the rest in gated groups (the last two load the model whole). "
            "These save weightkit's own format, which weightkit.load reads (a foldgpt model with --share 1 "
            "is a plain checkpoint with fewer layers; weightkit export --dense expands any of them)."
        ),
        epilog=(
            "examples:\n"
            "  weightkit compress ./my-model -o ./my-model-w4 --method gptq --bits 4 --group-size 128\n"
            "  weightkit compress ./my-model -o ./my-model-fp8 --method fp8 --group-size channel\n"
            "  weightkit compress ./my-model -o ./my-model-nvfp4 --method fp4\n"
            "  weightkit compress ./my-model -o ./my-model-ternary --method ternary --group-size 64\n"
            "  weightkit compress ./my-model -o ./my-model-vptq2 --method vptq --bits 2\n"
            "  weightkit compress ./my-llm -o ./my-llm-gwq3 --method gwq --bits 3 --outlier-fraction 0.01\n"
            "  weightkit compress ./my-model -o ./my-model-flex --method flexround --bits 4 --steps 100\n"
            "  weightkit compress ./my-llm -o ./my-llm-rec --method recursive --blocks 4 --relax-rank 16\n"
            "  weightkit compress ./my-model -o ./my-model-svd --method svd --ratio 0.5\n"
            "  weightkit compress ./my-model -o ./my-model-welore --method welore --rank-reduction 0.5\n"
            "  weightkit compress ./my-model -o ./my-model-dict --method dictionary --atoms 2\n"
            "  weightkit compress ./my-llm -o ./my-llm-fold --method foldgpt --drop 4 --share 2\n"
            "  weightkit compress ./my-llm -o ./my-llm-bitstack --method bitstack --budget-mb 3000\n"
            "  weightkit compress ./my-model -o ./my-model-24 --method sparsegpt --sparsity 2:4\n"
            "  weightkit compress ./my-model -o ./out --recipe recipe.yaml\n"
            "  weightkit compress ./my-model -o ./sweep --method rtn,gptq --sweep bits=2,3,4,8"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model", help="Hugging Face model directory (safetensors)")
    c.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    # Method flags default to "not given" (see _FLAGS); the defaults in their help are the configs'.
    method = c.add_argument_group("method (or --recipe)")
    flag = functools.partial(method.add_argument, default=argparse.SUPPRESS)
    flag(
        "--method",
        type=_methods_arg,
        metavar="{" + ",".join(_METHODS) + "}",
        help="quantization method, or with --sweep a comma list of methods to compare (default: gptq)",
    )
    flag(
        "--bits",
        type=_bits_arg,
        help="integer methods (rtn, gptq, awq, gwq, flexround): bits per weight, 2-8 (default: 4); vptq: "
        "index bits per weight, may be fractional with a fitting vector length (2.5 with v=2, 4 ...), "
        "codebooks not counted (default: 2)",
    )
    flag(
        "--group-size",
        type=_group_size_arg,
        help="input columns per scale: 32, 64, 128 ... or 'channel' for per-channel (default: 128; fp8: "
        "channel; fp4: 16, the only size NVFP4 stores; ternary: 128)",
    )
    flag("--asym", action="store_true", help="asymmetric grid with a zero point (default: symmetric)")
    flag(
        "--fp8-format",
        choices=("e4m3", "e5m2"),
        help="FP8: e4m3 (saved as compressed-tensors float-quantized) or e5m2 (no saved format: refused "
        "when saving) (default: e4m3)",
    )
    flag(
        "--power-of-two",
        choices=("m1", "m2"),
        help="FP8: ZeroQuant-FP's power-of-two scales: m1 rounds each scale up to a power of two, m2 keeps "
        "one real factor per output row (default: exact scales)",
    )
    flag(
        "--threshold",
        type=float,
        help="ternary: weights with |w| <= threshold * mean|w| of their group become 0 (default: 0.5, "
        "BitNet b1.58's rounding); welore: singular values normalised to [0, 1] below it are dropped, one "
        "threshold for every matrix (default: 0.175)",
    )
    flag(
        "--ratio",
        type=float,
        help="svd: fraction of the selected layers' weight parameters kept, in (0, 1], ranks allocated "
        "across layers by singular-value energy (default: 0.5)",
    )
    flag(
        "--rank-reduction",
        type=float,
        help="welore: instead of --threshold, the share of the selected matrices' total rank to remove, in "
        "(0, 1); the threshold is solved for it",
    )
    flag(
        "--min-ratio",
        type=float,
        help="welore: a matrix losing more than this share of its rank is a low-rank component, stored as "
        "two factors; the others stay dense (default: 0.4999)",
    )
    flag(
        "--sparsity",
        type=_sparsity_arg,
        help="pruning (magnitude, random, wanda, sparsegpt): fraction of each layer's weights set to zero, "
        "in (0, 1), or N:M such as 2:4 / 4:8 (N zeros in every M consecutive input weights of a row) "
        "(default: 0.5)",
    )
    flag(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        help="GPTQ/VPTQ: quantize the most-activated input columns first (default: on)",
    )
    flag("--damp", type=float, help="GPTQ/VPTQ: Hessian dampening fraction (default: 0.01)")
    flag(
        "--hessian-shrinkage",
        action=argparse.BooleanOptionalAction,
        help="GPTQ: shrink the Hessian toward its diagonal when calibration tokens are scarce, so the "
        "result stays near round-to-nearest rather than below it; fades with more data (default: on; "
        "off is the paper's GPTQ)",
    )
    flag(
        "--duo-scaling",
        action=argparse.BooleanOptionalAction,
        help="AWQ: scale candidates from input and weight magnitudes, x^a / w^(1-a), as llm-compressor and "
        "AutoAWQ (default: on; off is the paper's x^a)",
    )
    flag(
        "--vector-length",
        type=int,
        help="VPTQ: output rows per vector; longer fits better but the codebook grows as 2^(bits x length) "
        "(default: per layer, the longest whose codebook stays under 0.125 bits per weight with at most "
        "4096 codewords)",
    )
    flag(
        "--residual-bits",
        type=float,
        help="VPTQ: of --bits, the index bits per weight of a residual codebook (default: 0, none)",
    )
    flag(
        "--kmeans-iterations",
        type=int,
        help="VPTQ: most k-means steps per codebook; the time of VPTQ is mostly these (default: 100)",
    )
    flag(
        "--outlier-fraction",
        type=float,
        help="GWQ: share of each weight kept in 16 bit, by largest loss gradient, in [0, 1); each costs 48 "
        "bits (default: 0.01)",
    )
    flag(
        "--steps",
        type=int,
        help="FlexRound: Adam steps per transformer block, one calibration batch each; 0 is round-to-nearest "
        "(default: 100); FoldGPT: Adam steps per shared block learning its gates; 0 keeps gates of one "
        "(default: 50)",
    )
    flag(
        "--lr",
        type=float,
        help="FlexRound: Adam's learning rate for the rounding factors (default: 0.003); FoldGPT: for the "
        "gates (default: 0.01)",
    )
    flag(
        "--atoms",
        type=int,
        help="dictionary: shared matrix atoms per attention projection type, at least 1 and fewer than the "
        "blocks (default: 2)",
    )
    flag(
        "--drop",
        type=int,
        help="foldgpt: blocks to remove, those whose output is most like their input (default: 1)",
    )
    flag(
        "--share",
        type=int,
        help="foldgpt: blocks per weight-sharing group among those kept; 1 shares nothing (default: 2)",
    )
    flag(
        "--blocks",
        type=int,
        help="recursive: K, the unique layers kept; layer l runs shared layer l mod K, so K must divide the "
        "layer count (required)",
    )
    flag(
        "--init",
        choices=("stepwise", "average", "lower"),
        help="recursive: shared layers from pretrained ones at regular intervals (stepwise), averaged over "
        "the layers they serve (average) or the first K (lower) (default: stepwise; average with "
        "--relax-rank)",
    )
    flag(
        "--relax-rank",
        type=int,
        help="recursive: rank of each layer's own LoRA, from the SVD of what tying took from it; 0 is strict "
        "recursion (default: 0)",
    )
    flag(
        "--budget-mb",
        type=float,
        help="BitStack: store only the residual blocks that fit this many MB (10^6 bytes) with the rest of "
        "the model; any smaller budget can still be loaded with weightkit.load(path, budget_mb=N) "
        "(default: store every block)",
    )
    flag(
        "--iterations",
        type=int,
        help="BitStack: residual blocks per layer, each ~1 bit per weight plus its vectors (default: 16)",
    )
    flag("--rank", type=int, help="BitStack: rank of each block's vectors (default: 16)")
    flag(
        "--importance",
        choices=("activation", "perplexity"),
        help="BitStack: rank blocks within a level by the share of the layer's activation-weighted error "
        "each removes (streams, any model), or by the paper's calibration loss of the whole model with the "
        "block added (causal LMs; loads the model whole, (iterations - 1) x layers evaluations) "
        "(default: activation)",
    )
    flag("--calib-samples", type=int, help="calibrated methods: calibration texts used (default: 128)")
    flag("--seq-len", type=int, help="calibrated methods: max tokens per calibration text (default: 512)")
    flag(
        "--seed",
        type=int,
        help="calibrated methods: seed for picking calibration texts (and VPTQ's k-means); random: seed of "
        "the masks (default: 0)",
    )
    method.add_argument(
        "--recipe", help="YAML recipe holding the whole method config (instead of the flags above)"
    )
    c.add_argument(
        "--calib",
        help="calibration text for GPTQ/AWQ/VPTQ/GWQ/FlexRound/FoldGPT: .txt (passages split by blank "
        "lines), .jsonl or .json with a 'text' field (default: docstrings of Python's standard library)",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue an interrupted run (Ctrl-C, a kill, a full disk) from what it kept in OUTPUT.partial/: "
            "the shards it finished (rtn, fp8, fp4, ternary) or the blocks it calibrated (gptq, awq, "
            "sparsegpt, wanda); run the same command with the same options (a difference is refused by "
            "name). Without it, an OUTPUT.partial/ left by an earlier run is refused"
        ),
    )
    compress_sweep.add_sweep_options(c)
    c.set_defaults(run=_cmd_compress)
    common_options(c, force=True, max_shard_size=True, allow_pickle=True, device=True)
