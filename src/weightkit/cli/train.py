"""``weightkit train``: full-parameter training with a memory-efficient optimizer."""

import argparse
from typing import Any

from weightkit.cli.common import common_options, mb, print_table, train_config, training_options

# Mirrors weightkit.train.trainer.OPTIMIZERS (imported lazily: torch is not loaded to show --help).
_OPTIMIZERS = ("galore", "galore-layerwise", "qgalore", "svdfree", "adamw", "adamp", "zo", "zo-dist")


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.runtime.distributed import is_main_process
    from weightkit.train.trainer import default_lr, train_model

    config = train_config(args, lr=default_lr(args.optimizer) if args.lr is None else args.lr, seed=args.seed)
    summary = train_model(
        args.model, args.output, config, optimizer=args.optimizer, rank=args.rank,
        update_proj_gap=args.update_proj_gap, data=args.data, eval_data=args.eval_data, device=args.device,
        resume=args.resume, overwrite=args.force, progress=not args.json, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if not args.json and is_main_process():
        rows = [
            {"setting": "optimizer", "value": args.optimizer},
            {"setting": "steps", "value": summary["steps"]},
            {"setting": "parameters", "value": f"{summary['parameters']:,}"},
            {"setting": "optimizer state", "value": mb(summary["optimizer_state_bytes"])},
            {"setting": "train loss (last 10 steps)", "value": f"{summary['train_loss']:.4f}"},
            *({"setting": k, "value": f"{v:.4f}"} for k, v in summary["eval"].items()),
        ]
        print_table(f"model saved to {summary['output']}", rows)
    return summary


def add_parsers(sub) -> None:
    """Add ``train`` to the ``weightkit`` subcommands."""
    t = sub.add_parser(
        "train",
        help="train every weight of a model with a memory-efficient optimizer (GaLore, Q-GaLore, MeZO ...)",
        description=(
            "Full-parameter training of a Hugging Face model directory; the output is an ordinary Hugging "
            "Face directory (float32 weights, tokenizer, model card). Decoders learn the texts (causal-LM "
            "loss); encoders learn to classify: give a .jsonl file with 'text' and 'label'. Evaluates on "
            "held-out examples, checkpoints every --save-every steps to OUTPUT-checkpoints/, stops on a "
            "NaN/Inf loss keeping the last good state, and --resume continues an interrupted run (Ctrl-C "
            "saves one) to the same result bit for bit. Trains on the GPU when there is one (--device).\n\n"
            "optimizers (--optimizer):\n"
            "  galore            AdamW with its moments in a rank-r projection of each block matrix's\n"
            "                    gradient (--rank, --update-proj-gap); other weights plain AdamW\n"
            "  galore-layerwise  GaLore updating each weight in its gradient hook: no full gradient\n"
            "  qgalore           GaLore with 4-bit projections, refreshed less often once they settle\n"
            "  svdfree           GaLore with DCT basis vectors instead of SVDs\n"
            "  adamw             torch's AdamW (the baseline)\n"
            "  adamp             AdamP (no norm growth of scale-invariant weights)\n"
            "  zo                MeZO: two forward passes per step, the memory of inference\n"
            "  zo-dist           MeZO over torchrun processes exchanging one number each per step\n\n"
            "Several processes: torchrun --nproc-per-node N $(which weightkit) train ... (zo-dist "
            "requires it; the gradient optimizers but galore-layerwise run under DistributedDataParallel). "
            "The log ends by saying that every process holds identical weights."
        ),
        epilog=(
            "examples:\n"
            "  weightkit train ./llama -o ./trained --optimizer galore --rank 128 --data train.jsonl "
            "--max-steps 1000\n"
            "  weightkit train ./llama -o ./trained --optimizer zo --data train.txt --max-steps 20000\n"
            "  torchrun --nproc-per-node 4 $(which weightkit) train ./llama -o ./trained --optimizer zo-dist "
            "--data train.txt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("model", help="Hugging Face model directory (safetensors, with its tokenizer)")
    t.add_argument("-o", "--output", required=True, help="model directory to write")
    t.add_argument("--optimizer", choices=_OPTIMIZERS, default="galore", help="(default: galore; see above)")
    t.add_argument(
        "--rank", type=int, default=128, help="GaLore's projection rank, at most each block matrix's smaller "
        "side (default: 128)"
    )  # fmt: skip
    t.add_argument(
        "--update-proj-gap", type=int, default=200, help="steps between GaLore's projection refreshes "
        "(default: 200)"
    )  # fmt: skip
    training_options(t, result="model")
    t.add_argument("--lr", type=float, help="learning rate (default: 1e-5; 1e-6 for zo and zo-dist)")
    t.add_argument("--seed", type=int, default=0, help="seed of shuffling, split, head and MeZO's directions")
    t.set_defaults(run=_cmd_train)
    common_options(t, force=True, allow_pickle=True, device=True)
