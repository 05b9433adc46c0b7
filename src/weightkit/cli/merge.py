"""``weightkit merge``, ``extract-lora``, ``align`` and ``fisher``: the merging subcommands."""

import argparse
import math
import time
from pathlib import Path
from typing import Any

from weightkit.cli.common import common_options, mb, print_table, refuse_existing
from weightkit.errors import WeightkitError
from weightkit.progress import console, results


def _cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge import merge, merge_slices, prepare_merge, prepare_slices
    from weightkit.merge.engine import MergePart, close_plan, merge_device
    from weightkit.merge.recipe import DTYPES, load_merge_recipe
    from weightkit.registry import config_to_dict

    recipe = load_merge_recipe(args.recipe)
    if args.random_seed is not None:
        recipe.config = _seeded(recipe.config, recipe.source, args.random_seed)
    dtype = DTYPES[args.dtype] if args.dtype else recipe.dtype
    out = Path(args.output)
    if args.dry_run and args.resume:
        raise WeightkitError("--dry-run writes nothing, so there is nothing for --resume to continue")
    if not args.dry_run:
        refuse_existing(out, args.force)
    config = config_to_dict(recipe.config)
    options = {"allow_pickle": args.allow_pickle, "tokenizer_source": recipe.tokenizer_source}
    if args.dry_run:
        device = merge_device(recipe.config, args.device)
        if recipe.slices is not None:
            parts, reference, _ = prepare_slices(recipe.base, recipe.slices, recipe.config, **options)
            rows = _slice_rows(recipe.slices)
        else:
            plan, models = prepare_merge(recipe.base, recipe.models, recipe.config, **options)
            parts, reference = [MergePart(plan, models, recipe.config)], plan.reference
            rows = _model_rows(plan, models)
        try:
            summary = {**_merge_plan_summary(parts, rows, config, dtype), "device": str(device)}
        finally:
            reference.close()
            for part in parts:
                close_plan(part.plan, part.models)
        if not args.json:
            print_table("merge plan (dry run: nothing written)", summary["models"])
            results.print(
                f"{summary['method']}: {summary['tensors']} tensors, reads {mb(summary['input_bytes'])}, "
                f"writes ~{mb(summary['output_bytes'])} to {out}, merges on {summary['device']}",
                highlight=False,
            )
        return {"dry_run": True, "output": str(out), **summary}
    run, inputs = (merge_slices, recipe.slices) if recipe.slices is not None else (merge, recipe.models)
    summary = run(
        recipe.base,
        inputs,
        recipe.config,
        out,
        dtype=dtype,
        max_shard_bytes=args.max_shard_size,
        overwrite=args.force,
        progress=not args.json,
        device=args.device,
        chat_template=recipe.chat_template,
        resume=args.resume,
        **options,
    )
    summary = {**summary, "output": str(out), "config": config, "seconds": round(summary["seconds"], 2)}
    if not args.json:
        row = {
            "method": summary["method"],
            "models": str(len(summary["models"])),
            "tensors": str(summary["tensors"]),
            "output size": mb(summary["output_bytes"]),
            "time (s)": f"{summary['seconds']:.1f}",
            "device": summary["device"],
        }
        if "sign_conflict_rate" in summary:
            row["sign conflicts"] = f"{summary['sign_conflict_rate']:.1%}"
        print_table("weightkit merge", [row])
        results.print(f"saved to [bold]{out}[/bold]")
    return summary


def _seeded(config: Any, recipe: dict[str, Any], seed: int) -> Any:
    """``config`` with ``seed`` set, for methods that draw random numbers (those with a ``seed`` field);
    other methods are deterministic and take ``--random-seed`` without effect, as mergekit-yaml does."""
    import dataclasses

    if "seed" not in {f.name for f in dataclasses.fields(config)}:
        return config
    given = (recipe.get("parameters") or {}).get("seed")
    if given is not None and given != seed:
        raise WeightkitError(
            f"--random-seed {seed} and the recipe's seed: {given} disagree; give the seed once"
        )
    return dataclasses.replace(config, seed=seed)


def _cmd_fisher(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge.fisher_compute import fisher_checkpoint

    start = time.perf_counter()
    out = fisher_checkpoint(
        args.model,
        args.data,
        args.output,
        samples=args.samples,
        max_length=args.seq_len,
        seed=args.seed,
        mode=args.mode,
        device=args.device,
        overwrite=args.force,
        progress=not args.json,
        allow_pickle=args.allow_pickle,
    )
    summary = {
        "model": str(args.model),
        "output": str(out),
        "mode": args.mode,
        "bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if not args.json:
        results.print(f"Fisher of {args.model} saved to [bold]{out}[/bold] ({mb(summary['bytes'])})")
    return summary


def _cmd_extract_lora(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge.extract_lora import extract_lora
    from weightkit.merge.recipe import DTYPES

    out = Path(args.output)
    refuse_existing(out, args.force)
    summary = extract_lora(
        args.base,
        args.finetuned,
        out,
        rank=args.rank,
        modules_to_save=_modules_to_save_arg(args.modules_to_save),
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.force,
        progress=not args.json,
        allow_pickle=args.allow_pickle,
    )
    summary = {**summary, "seconds": round(summary["seconds"], 2)}
    if not args.json:
        rows = [
            {"module": m["module"], "shape": "x".join(map(str, m["shape"])), "rank": m["rank"],
             "relative error": f"{m['relative_error']:.4f}"}
            for m in summary["modules"]
        ]  # fmt: skip
        print_table(f"weightkit extract-lora (rank {args.rank})", rows)
        for item in summary["modules_to_save"]:
            change = item["relative_change"]
            changed = f"changed by {change:.2%}" if change is not None else "changed from zero"
            results.print(f"saved whole: {item['module']} ({changed}; {mb(item['bytes'])})", highlight=False)
        for item in summary["skipped"]:
            change = item.get("relative_change")
            changed = f"changed by {change:.2%}" if change is not None else "changed"
            console.print(
                f"[yellow]not in the adapter[/yellow]: {item['tensor']} ({changed}; {item['reason']})"
            )
        results.print(
            f"{len(rows)} modules, max relative error {summary['max_relative_error']:.4f}, "
            f"{mb(summary['adapter_bytes'])}; saved to [bold]{out}[/bold]"
        )
    return summary


def _share(moved: float | None) -> str:
    """A fraction moved as a percentage; "-" where align does not permute those units."""
    return "-" if moved is None else f"{moved:.0%}"


def _modules_to_save_arg(text: str) -> str | list[str]:
    """``--modules-to-save``: ``auto``, ``none`` or comma-separated module names."""
    return text if text in ("auto", "none") else [name.strip() for name in text.split(",")]


def _cmd_align(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.merge.align import align_checkpoint

    out = Path(args.output)
    refuse_existing(out, args.force)
    summary = align_checkpoint(
        args.reference,
        args.model,
        out,
        overwrite=args.force,
        progress=not args.json,
        seed=args.seed,
        device=args.device,
        allow_pickle=args.allow_pickle,
    )
    summary = {**summary, "seconds": round(summary["seconds"], 2)}
    if not args.json:
        rows = [
            {"block": b["block"], "heads moved": _share(b["heads_moved"]),
             "neurons moved": _share(b["mlp_moved"]), "cosine before": f"{b['cosine_before']:.4f}",
             "cosine after": f"{b['cosine_after']:.4f}"}
            for b in summary["layers"]
        ]  # fmt: skip
        print_table("weightkit align (weight matching to the reference)", rows)
        results.print(f"saved to [bold]{out}[/bold]")
    return summary


def _parameters(given: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in given.items()) or "method defaults"


def _model_rows(plan, models) -> list[dict[str, str]]:
    """The models of a ``models:`` recipe and their parameters."""
    rows = [{"model": f"{plan.reference.path} (base)", "parameters": "-"}] if plan.has_base else []
    return rows + [{"model": str(m.path), "parameters": _parameters(m.overrides)} for m in models]


def _slice_rows(slices) -> list[dict[str, str]]:
    """The sources of a ``slices:`` recipe: slice, model, layers and parameters (the slice's, then the
    source's own)."""
    return [
        {"slice": str(i), "model": str(s.model), "layers": f"{s.layer_range[0]}-{s.layer_range[1] - 1}",
         "parameters": _parameters({**piece.parameters, **s.parameters})}
        for i, piece in enumerate(slices)
        for s in piece.sources
    ]  # fmt: skip


def _merge_plan_summary(parts, rows, config: dict[str, Any], dtype) -> dict[str, Any]:
    """What a merge would do: method, inputs and their parameters, tensors, bytes in and out."""
    jobs = [(part.plan, job) for part in parts for job in part.plan.jobs]
    out_bytes = 0
    for plan, job in jobs:
        element = (dtype or plan.reference.dtype(job.sources[0])).itemsize
        out_bytes += element * math.prod(job.shape)
    readers = {r.path.resolve(): r for part in parts for r in part.plan.readers}
    return {
        "method": config["method"],
        "config": config,
        "models": rows,
        "tensors": len(jobs),
        "input_bytes": sum(r.nbytes() for r in readers.values()),
        "output_bytes": out_bytes,
    }


def add_parsers(sub) -> None:
    """Add ``merge``, ``extract-lora``, ``align`` and ``fisher`` to the ``weightkit`` subcommands."""
    m = sub.add_parser(
        "merge",
        help="merge fine-tunes of one base model from a mergekit-style YAML recipe",
        description=(
            "Merge models with TIES, DARE, task arithmetic, SLERP, NuSLERP, Multi-SLERP, Karcher, SCE, "
            "NearSwap, Arcee Fusion, Model Stock, Breadcrumbs, DELLA, linear averaging and more, streamed "
            "tensor by tensor, or stack layer ranges of models (slices, passthrough). The recipe uses "
            "mergekit's YAML schema (models or slices, base_model, merge_method, parameters, dtype), so "
            "mergekit recipes run unchanged."
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
            "  weightkit merge recipe.yaml -o ./merged --dry-run\n"
            "  weightkit merge recipe.yaml -o ./merged --resume   # after an interrupted run"
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
    m.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue an interrupted merge (Ctrl-C, a kill, a full disk) from the shards it finished, kept "
            "in OUTPUT.partial/; run the same command with the same recipe and options (a difference is "
            "refused by name). Without it, an OUTPUT.partial/ left by an earlier run is refused"
        ),
    )
    m.add_argument(
        "--random-seed",
        type=int,
        metavar="N",
        help=(
            "seed of the methods that draw random numbers (dare_linear, dare_ties, della, della_linear: "
            "which entries they drop), like mergekit-yaml's --random-seed; the same seed and inputs give "
            "the same output. Other methods are deterministic and accept it without effect. weightkit "
            "draws its own per-tensor random streams, so a seed does not reproduce mergekit's masks "
            "(default: the recipe's seed parameter, else 0)"
        ),
    )
    m.add_argument(
        "--lora-merge-cache",
        metavar="DIR",
        help=(
            "accepted so mergekit-yaml command lines run unchanged: mergekit merges each 'model+lora' "
            "reference into a model saved in DIR first; weightkit merges the adapter into each tensor as it "
            "reads it, so it writes no cache and leaves DIR alone"
        ),
    )
    m.set_defaults(run=_cmd_merge)

    x = sub.add_parser(
        "extract-lora",
        help="approximate a fine-tune as a LoRA adapter of its base model (PEFT format)",
        description=(
            "Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) whose layers are "
            "the truncated SVD of each changed Linear weight's difference, fine-tuned minus base, and "
            "which holds the changed embeddings, norms and other modules a LoRA cannot hold as whole "
            "copies (PEFT's modules_to_save). The summary gives each layer's relative error "
            "||dW - BA|| / ||dW||, each saved module's relative change, and the changed tensors left out "
            "(with a warning naming the largest). Load it with "
            "peft.PeftModel.from_pretrained(base_model, OUT)."
        ),
    )
    x.add_argument("base", help="the base model directory")
    x.add_argument("finetuned", help="the fine-tuned model directory (same architecture)")
    x.add_argument("-r", "--rank", type=int, required=True, help="LoRA rank (capped at each layer's size)")
    x.add_argument("-o", "--output", required=True, help="adapter directory (must not exist unless --force)")
    x.add_argument(
        "--modules-to-save",
        default="auto",
        metavar="auto|none|NAME,...",
        help=(
            "modules the adapter holds whole, as PEFT's modules_to_save, so that PEFT puts the fine-tune's "
            "tensors in place of the base's. auto (default): every module without LoRA factors "
            "(embeddings, norms, a tied output head ...) one of whose tensors changed by at least 0.1%% of "
            "its norm; none: no module; NAME,...: these modules, changed or not, instead of LoRA factors "
            "(full names or dotted suffixes, e.g. embed_tokens,norm)"
        ),
    )
    x.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="dtype of the stored factors (default: the fine-tuned weights' dtype; whole modules keep it)",
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
            "reference's: merge models trained from different seeds after aligning them. Llama family, "
            "Mixtral (heads only), Phi-3, GPT-2, GPT-NeoX, OPT, Falcon and T5 (neurons only), BERT family, "
            "ViT."
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
    common_options(m, force=True, max_shard_size=True, allow_pickle=True, device=True)
    common_options(x, force=True, allow_pickle=True)
    for p in (a, f):
        common_options(p, force=True, allow_pickle=True, device=True)
