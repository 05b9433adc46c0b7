"""``weightkit eval``: perplexity or embedding fidelity of a model directory."""

import argparse
from typing import Any

from weightkit.cli.common import common_options, print_table
from weightkit.errors import WeightkitError


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.data import load_texts, stdlib_docstrings
    from weightkit.eval import evaluate
    from weightkit.models import load_model
    from weightkit.runtime.device import resolve_device

    device = resolve_device(args.device)  # a device this machine lacks stops before any loading
    model, tokenizer, kind = load_model(args.model, allow_pickle=args.allow_pickle)
    if kind not in ("causal-lm", "encoder"):
        raise WeightkitError(
            f"{args.model} is a {kind} model; weightkit eval measures causal LMs (perplexity) and text "
            "encoders (embedding fidelity) only"
        )
    if tokenizer is None:
        raise WeightkitError(f"{args.model} has no tokenizer files; evaluation needs one")
    if args.adapter:
        from weightkit.adapt import load_adapter

        load_adapter(model, args.adapter)
    texts = load_texts(args.data) if args.data else stdlib_docstrings("eval")
    texts = texts[: args.max_texts]
    reference = None
    if kind == "causal-lm" and args.reference:
        raise WeightkitError(
            f"--reference applies to encoders (embedding fidelity); {args.model} is a causal LM, evaluated "
            "by perplexity on --data: leave --reference out"
        )
    if kind == "encoder":
        if not args.reference:
            raise WeightkitError(
                "embedding fidelity of an encoder needs --reference FULL_PRECISION_MODEL_DIR"
            )
        reference, _, _ = load_model(args.reference, allow_pickle=args.allow_pickle)
    metrics = evaluate(
        model, tokenizer, kind, texts, reference=reference, device=device, progress=not args.json
    )
    result = {"model": str(args.model), "adapter": args.adapter, "kind": kind, "texts": len(texts)}
    result.update({"device": str(device), **metrics})
    if not args.json:
        print_table(
            "weightkit eval",
            [{"metric": k, "value": f"{v:.4f}"} for k, v in metrics.items()]
            + [{"metric": "texts", "value": str(len(texts))}],
        )
    return result


def add_parsers(sub) -> None:
    """Add ``eval`` to the ``weightkit`` subcommands."""
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
    e.add_argument(
        "--adapter", help="a PEFT-format adapter directory (PEFT's or weightkit's) to evaluate the model with"
    )
    e.add_argument("--data", help="evaluation text: .txt, .jsonl or .json (default: stdlib docstrings)")
    e.add_argument("--reference", help="encoders: the full-precision model to compare embeddings against")
    e.add_argument("--max-texts", type=int, default=256, help="evaluate on at most this many texts")
    e.set_defaults(run=_cmd_eval)
    common_options(e, allow_pickle=True, device=True)
