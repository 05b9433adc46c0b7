"""``weightkit verify``: re-check an output directory against its integrity manifest."""

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from weightkit.cli.common import common_options
from weightkit.progress import results

if TYPE_CHECKING:
    from weightkit.checkpoint.manifest import Finding

# weightkit.checkpoint imports torch: its manifest module is imported when the command runs, so that
# `weightkit verify --help` and the other commands' start-up stay light (OpenMP's settings are made before
# torch loads). The file's name, for --help:
_MANIFEST = "weightkit_manifest.json"

# How much of a sha256 a table shows: enough to tell two apart at a glance (the JSON has all of it).
_PREFIX = 12


def _row(finding: "Finding", kind: str) -> dict[str, Any]:
    return {"kind": kind, **dataclasses.asdict(finding), "failure": finding.failure}


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for column in ("", "file", "status", "expected sha256", "actual sha256"):
        table.add_column(column, overflow="fold")
    for row in rows:
        expected, actual = (row[k][:_PREFIX] if row[k] else "-" for k in ("expected", "actual"))
        if row["status"] == "changed" and row["actual"] is None:
            actual = "(size differs)"
        style = "red" if row["failure"] else "yellow"
        table.add_row(
            row["kind"], escape(row["path"]), f"[{style}]{row['status']}[/{style}]", expected, actual
        )
    results.print(table)


def _cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from weightkit.checkpoint.manifest import (
        MANIFEST_NAME,
        check_inputs,
        check_outputs,
        read_manifest,
        summarize,
    )
    from weightkit.errors import WeightkitError

    directory = Path(args.directory)
    manifest = read_manifest(directory)
    findings = check_outputs(directory, manifest, progress=not args.json)
    rows = [_row(f, "output") for f in findings]
    if args.inputs:
        input_findings = check_inputs(manifest, directory, progress=not args.json)
        findings += input_findings
        rows += [_row(f, "input") for f in input_findings]
    failed = summarize(findings)
    summary = {
        "directory": str(directory),
        "ok": not failed,
        "verb": manifest.get("verb"),
        "method": manifest.get("method"),
        "weightkit_version": manifest.get("weightkit_version"),
        "files_checked": len(manifest["files"]),
        "inputs_checked": args.inputs,
        "findings": rows,
    }
    if args.json:
        if failed:  # main prints the summary of a successful command; a failing one prints it here
            print(json.dumps(summary, indent=2))
    else:
        if rows:
            _print_table(f"{directory}: differences from {MANIFEST_NAME}", rows)
        what = f"{len(manifest['files'])} files" + (" and the inputs still present" if args.inputs else "")
        if not failed:
            results.print(f"[green]ok[/green]: {escape(str(directory))}: {what} match {MANIFEST_NAME}")
    if failed:
        raise WeightkitError(f"{directory} does not match its manifest: {failed}")
    return summary


def add_parsers(sub) -> None:
    """Add ``verify`` to the ``weightkit`` subcommands."""
    v = sub.add_parser(
        "verify",
        help="re-check an output directory against its integrity manifest (weightkit_manifest.json)",
        description=(
            f"Every directory weightkit writes holds {_MANIFEST}: the weightkit version, the command, "
            "method and full configuration, and the sha256 and size of every input file and every output "
            "file. verify re-hashes the output's files and names each one changed (with the expected and "
            "actual sha256), missing, or added since. With --inputs it also re-hashes the inputs still at "
            "their recorded paths: a changed, missing or added input file fails; an input path that no "
            "longer exists at all is reported 'not found' without failing. Exit status 0 when everything "
            "matches, 1 otherwise (and for a directory without a manifest or with a corrupt one)."
        ),
        epilog="examples:\n  weightkit verify ./my-model-gptq\n  weightkit verify ./merged --inputs --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("directory", help="an output directory weightkit wrote")
    v.add_argument("--inputs", action="store_true", help="also re-check the inputs recorded in the manifest")
    v.set_defaults(run=_cmd_verify)
    common_options(v)
