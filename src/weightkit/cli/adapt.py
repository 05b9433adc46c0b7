"""``weightkit adapt``: train an adapter and save it in PEFT's format."""

import argparse
import json
import warnings
from typing import Any

from weightkit.cli.common import common_options, print_table, refuse_existing, train_config, training_options
from weightkit.errors import WeightkitError


def _option_value(text: str) -> Any:
    """``--option`` values: JSON (numbers, true/false, lists, objects) or else a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _cmd_lrc(args: argparse.Namespace) -> dict[str, Any]:
    """``--method lrc``: train a WeLore checkpoint's low-rank factors (weightkit.adapt.lrc), no adapter."""
    from weightkit.adapt.lrc import finetune_lrc

    given = {
        "--rank": args.rank is not None,
        "--alpha": args.alpha is not None,
        "--target": args.target is not None,
        "--option": bool(args.option),
        "--no-autocast-adapter-dtype": not args.autocast_adapter_dtype,
        "--allow-pickle": args.allow_pickle,
    }
    if any(given.values()):
        flags = ", ".join(flag for flag, on in given.items() if on)
        raise WeightkitError(
            f"{flags} does not apply to method lrc: it trains the factors the checkpoint's low-rank layers "
            "already have, adding no adapter"
        )
    train = train_config(args, lr=args.lr, seed=args.seed if args.seed is not None else 0)
    summary = finetune_lrc(
        args.model, args.output, train, data=args.data, eval_data=args.eval_data, device=args.device,
        overwrite=args.force, resume=args.resume, progress=not args.json,
    )  # fmt: skip
    if not args.json:
        rows = [{"setting": "method", "value": "lrc"}]
        rows += [
            {"setting": k, "value": summary[k]}
            for k in ("lrc_layers", "steps", "trainable_parameters", "total_parameters")
        ]
        rows.append({"setting": "train loss (last 10 steps)", "value": f"{summary['train_loss']:.4f}"})
        rows += [{"setting": k, "value": f"{v:.4f}"} for k, v in summary["eval"].items()]
        print_table(f"model with trained low-rank components saved to {summary['output']}", rows)
    return summary


def _cmd_adapt(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from weightkit.adapt.trainer import finetune
    from weightkit.registry import config_from_dict, lookup

    if args.method == "lrc":
        return _cmd_lrc(args)
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
    alpha = getattr(adapter_config, "alpha", None)
    if isinstance(alpha, int | float) and alpha < 0:
        warnings.warn(
            f"alpha {alpha} is negative: the update is scaled by alpha / rank, so its sign is flipped "
            "(training learns the opposite factors); give a positive alpha unless that is meant",
            stacklevel=1,
        )
    train = train_config(args, lr=args.lr, seed=args.seed if args.seed is not None else 0)
    summary = finetune(
        args.model, adapter_config, args.output, train, data=args.data, eval_data=args.eval_data,
        device=args.device, autocast_adapter_dtype=args.autocast_adapter_dtype, overwrite=args.force,
        resume=args.resume, progress=not args.json, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if not args.json:
        rows = [{"setting": "method", "value": args.method}]
        rows += [
            {"setting": k, "value": summary[k]} for k in ("steps", "trainable_parameters", "total_parameters")
        ]
        rows.append({"setting": "train loss (last 10 steps)", "value": f"{summary['train_loss']:.4f}"})
        rows += [{"setting": k, "value": f"{v:.4f}"} for k, v in summary["eval"].items()]
        print_table(f"adapter saved to {summary['output']}", rows)
    return summary


def _cmd_merge_adapter(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from weightkit.adapt.merged_reader import merge_adapter_checkpoint

    refuse_existing(Path(args.output), args.force)
    summary = merge_adapter_checkpoint(
        args.base, args.adapter, args.output, overwrite=args.force, progress=not args.json,
        allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if not args.json:
        rows = [{"setting": k, "value": str(summary[k])} for k in ("tensors", "merged")]
        print_table(f"merged model saved to {summary['output']}", rows)
    return summary


def add_parsers(sub) -> None:
    """Add ``adapt`` to the ``weightkit`` subcommands."""
    t = sub.add_parser(
        "adapt",
        help="fine-tune an adapter (LoRA, DoRA, EVA, LoRA-SB, Bone, MoS ...) and save it in PEFT's format",
        description=(
            "Add an adapter to a Hugging Face model directory, train it and save it in PEFT's format "
            "(adapter_config.json + adapter_model.safetensors). Decoders learn the texts (causal-LM loss); "
            "encoders learn to classify: give a .jsonl file with 'text' and 'label'. Evaluates on held-out "
            "examples (perplexity or accuracy). Trains on the GPU when there is one (--device). Several "
            "processes: torchrun --nproc-per-node N -m weightkit.cli adapt ... (DistributedDataParallel, one "
            "GPU each)."
        ),
        epilog=(
            "examples:\n"
            "  weightkit adapt ./llama -o ./adapter --rank 8 --data train.jsonl --max-steps 500\n"
            "  weightkit adapt ./minilm -o ./cls --method eva --rank 8 --data reviews.jsonl --epochs 3\n"
            "  weightkit adapt ./llama -o ./out --method lora --option dora=true --target 're:.*proj'\n"
            "  weightkit adapt ./llama-welore -o ./llama-welore-ft --method lrc --data train.txt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("model", help="Hugging Face model directory (safetensors, with its tokenizer)")
    t.add_argument("-o", "--output", required=True, help="adapter directory to write")
    t.add_argument(
        "--method",
        default="lora",
        help="adapter method: lora, dora, pissa, olora, eva, lora_sb, lora_xs, svfit, bone, mos, increlora, "
        "did, said (intrinsic-dimension subspaces; their size is --option dim=N); or lrc: train the low-rank "
        "factors of a `weightkit compress --method welore` output, everything else frozen, and save that "
        "checkpoint (no adapter) (default: lora)",
    )
    t.add_argument("--rank", type=int, help="adapter rank (method default if not given; not for did/said)")
    t.add_argument("--alpha", type=float, help="LoRA-style scaling numerator alpha (method default)")
    t.add_argument(
        "--target",
        action="append",
        help="module to adapt: exact name, 're:' regex over full names, or 'all-linear' (every linear layer "
        "but the output head, as PEFT's); repeat for several (default: the attention query and value "
        "projections)",
    )
    t.add_argument("--option", action="append", default=[], help="any other method option, KEY=VALUE")
    training_options(t, result="adapter")
    t.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    t.add_argument("--seed", type=int, help="seed of initialisation, shuffling and split (default: 0)")
    t.add_argument(
        "--autocast-adapter-dtype",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the adapter in float32 on a bfloat16/float16 model, as PEFT's autocast_adapter_dtype "
        "(default); --no-autocast-adapter-dtype keeps the model's dtype",
    )
    t.set_defaults(run=_cmd_adapt)
    common_options(t, force=True, allow_pickle=True, device=True)

    m = sub.add_parser(
        "merge-adapter",
        help="merge a PEFT LoRA adapter into its base model and save a Hugging Face model directory",
        description=(
            "PEFT's merge_and_unload + save_pretrained, streamed one tensor at a time (no model is built, so "
            "any size fits in memory): each adapted weight gets its LoRA/DoRA update, modules_to_save and "
            "trained biases their saved values; the base's config and tokenizer are copied. The same "
            "weights as PEFT's merge (tested). LoRA adapters (PEFT's or weightkit's); for other adapter "
            "types use weightkit.load(base, adapter=...) and weightkit.adapt.merge_and_unload in Python."
        ),
    )
    m.add_argument("base", help="the base model directory the adapter was trained on")
    m.add_argument("adapter", help="the PEFT LoRA adapter directory (adapter_config.json + safetensors)")
    m.add_argument("-o", "--output", required=True, help="model directory to write")
    common_options(m, force=True, allow_pickle=True)
    m.set_defaults(run=_cmd_merge_adapter)
