"""What the subcommands share: argument types, the output check, tables and the common options."""

import argparse
import re
from pathlib import Path
from typing import Any

from rich.table import Table

from weightkit.errors import WeightkitError
from weightkit.progress import results

__all__ = [
    "size_arg",
    "refuse_existing",
    "mb",
    "print_table",
    "common_options",
    "training_options",
    "train_config",
]


def size_arg(text: str) -> int:
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


def refuse_existing(out: Path, force: bool) -> None:
    """Stop before any work when the output exists (the writers would refuse only at the end)."""
    if out.exists() and not force:
        raise WeightkitError(f"{out} exists; pass --force to overwrite it")


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(
            key, justify="left" if key in ("method", "setting", "model", "metric", "parameters") else "right"
        )
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    results.print(table)


def common_options(
    parser: argparse.ArgumentParser,
    *,
    force: bool = False,
    max_shard_size: bool = False,
    allow_pickle: bool = False,
    device: bool = False,
) -> None:
    """Add ``--json`` and, where asked, the options several subcommands share, worded the same everywhere."""
    parser.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout (no progress bars)"
    )
    if force:
        parser.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    if max_shard_size:
        parser.add_argument(
            "--max-shard-size", type=size_arg, default=5 * 10**9, help="output shard size (default: 5GB)"
        )
    if allow_pickle:
        parser.add_argument(
            "--allow-pickle",
            action="store_true",
            help="allow loading .bin/.pt pickle checkpoints (trusted only)",
        )
    if device:
        parser.add_argument(
            "--device",
            help="where to compute: cuda, cuda:1, cpu, mps ... (default: cuda when available, else cpu; "
            "under torchrun each process takes cuda:LOCAL_RANK)",
        )


def training_options(parser: argparse.ArgumentParser, *, result: str) -> None:
    """The options of the training loop ``adapt`` and ``train`` share (``--lr`` and ``--seed`` are each
    verb's own); ``result`` names what the run ends with, for ``--resume``'s help."""
    parser.add_argument(
        "--data",
        help="training examples: .txt (passages split by blank lines), .jsonl/.json with 'text' (and 'label' "
        "for encoders) (default for decoders: Python standard-library docstrings)",
    )
    parser.add_argument("--eval-data", help="held-out examples (default: 10%% of --data)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs passes)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data (default: 1)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="examples per step and process (default: 8)"
    )
    parser.add_argument("--seq-len", type=int, default=256, help="max tokens per example (default: 256)")
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="linear learning-rate warm-up (default: 0)"
    )
    parser.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every N steps (default: end only)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in OUTPUT-checkpoints/ (checkpoint-N, or interrupted after "
        f"Ctrl-C), with the same options; ends with the {result} the whole run would have given",
    )


def train_config(args: argparse.Namespace, *, lr: float, seed: int):
    """The :class:`~weightkit.runtime.training.TrainConfig` of :func:`training_options`' values."""
    from weightkit.runtime.training import TrainConfig

    return TrainConfig(
        max_steps=args.max_steps, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
        max_length=args.seq_len, warmup_steps=args.warmup_steps, save_every=args.save_every, seed=seed,
    )  # fmt: skip


def method_options_help(kind: str, method: str) -> str:
    """The options of ``method`` (a registered ``kind`` method) for ``--help``: each config field with its
    default (the method's preset applied) and the first line of its description in the config's docstring
    (its ``Attributes:`` section)."""
    import dataclasses
    import inspect
    import re
    import textwrap

    from weightkit.registry import lookup

    entry = lookup(kind, method)
    described, current, in_attributes = {}, None, False
    for line in (inspect.getdoc(entry.config_cls) or "").splitlines():
        if line.strip() == "Attributes:":
            in_attributes = True
        elif in_attributes and (found := re.match(r"    (\w+): (.*)", line)):
            current = found[1]
            described[current] = found[2]
        elif (
            in_attributes and line.startswith("        ") and current and not described[current].endswith(".")
        ):
            described[current] += " " + line.strip()  # finish the first sentence
        elif in_attributes and line and not line.startswith(" "):
            in_attributes = False
    if kind == "merge":
        lines = [f"parameters of merge_method {entry.name} (a recipe's parameters:, globally or per model):"]
    else:
        lines = [f"options of --method {entry.name} (--option KEY=VALUE; flags such as --rank set theirs):"]
    for field in dataclasses.fields(entry.config_cls):
        if field.default is not dataclasses.MISSING:
            default = entry.preset.get(field.name, field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "required"
        first = described.get(field.name, "").split(". ")[0].rstrip(".")  # its first sentence
        text = f"{field.name} = {default!r}" + (f": {first}" if first else "")
        lines.append(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def name_flag(message: str, field: str, flag: str) -> str:
    """``message`` with the config field ``field`` called by its ``flag``, where the message names the field
    (``bits must be ...``, ``bits 2.3: ...``, ``bits=9``), not where the word is prose (``index bits per
    vector``)."""
    return re.sub(rf"(?<![\w-]){field}(?= must| is|=| \d)", flag, message)
