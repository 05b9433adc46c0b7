"""Integrity manifests: what made an output directory, from what, and the checksum of every file in it.

Every directory :class:`~weightkit.checkpoint.writer.CheckpointWriter` publishes for a weightkit command
carries ``weightkit_manifest.json``, written just before the directory is published::

    {
      "manifest_version": 1,
      "weightkit_version": "0.1.0",
      "verb": "compress", "method": "gptq",
      "config": {"method": "gptq", "bits": 4, ...},            # every field, not a summary
      "inputs": [{"path": "/abs/model", "files": {"config.json": {"sha256": ..., "size": ...}, ...}},
                 {"path": "/abs/calib.txt", "sha256": ..., "size": ...}],
      "files": {"model.safetensors": {"sha256": ..., "size": ...}, ...}   # all but the manifest
    }

It holds no timestamp and no output path, so two runs of the same command give the same manifest and
outputs stay byte-reproducible. An input directory is recorded whole: every regular file under it except
hidden ones (``.git``, ``.cache``, weightkit's own temporary directories), its own manifest (bookkeeping
about the input, which re-running the command that made it rewrites) and weightkit's output when that
lies inside it. A run rarely reads every file of a model directory (a checkpoint stored both as
safetensors and as pickle, an ONNX export), but deciding which it read would mean tracking every reader,
tokenizer and config load; the whole directory is what a user can name and compare. Input checksums are
taken once per run (:meth:`Provenance.input_records`), when its first output is written, so a training
run's checkpoints do not hash the model again.

:func:`check_outputs` and :func:`check_inputs` compare a directory and its inputs against the manifest
(``weightkit verify``).
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from weightkit.checkpoint.files import tree_files
from weightkit.checkpoint.owner import OWNER_FILE
from weightkit.checkpoint.partial import partial_path
from weightkit.errors import WeightkitError
from weightkit.progress import track

__all__ = [
    "MANIFEST_NAME",
    "Finding",
    "Provenance",
    "build_manifest",
    "check_inputs",
    "check_outputs",
    "data_files",
    "file_record",
    "read_manifest",
    "sha256_file",
    "summarize",
    "tree_records",
    "write_manifest",
]

MANIFEST_NAME = "weightkit_manifest.json"
_MANIFEST_VERSION = 1
# sha256 of a large file in chunks this size: big enough that the Python loop costs nothing next to the
# hashing, small enough to stay out of the way of the model's own memory.
_CHUNK = 8 * 2**20


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of the file at ``path``, read in 8 MB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256": hex digest, "size": bytes}`` of one file."""
    return {"sha256": sha256_file(path), "size": os.path.getsize(path)}


def _tree_files(root: Path, *, skip_hidden: bool, skip: Path | None = None) -> list[str]:
    """:func:`tree_files` of ``root`` less ``root``'s own manifest and a writer's owner record; ``skip`` (an
    output) is left out with its resumable state (``<skip>.partial``)."""
    skipped = () if skip is None else (skip, partial_path(skip))
    names = tree_files(root, skip_hidden=skip_hidden, skip=skipped)
    return [rel for rel in names if rel not in (MANIFEST_NAME, OWNER_FILE)]


def tree_records(
    root: str | os.PathLike,
    *,
    skip_hidden: bool = False,
    skip: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """``{relative path: file_record}`` of every regular file under ``root`` except its manifest.

    Args:
        root: a directory.
        skip_hidden: leave out hidden files and directories (inputs: ``.git``, ``.cache``, temporaries).
        skip: a directory under ``root`` to leave out (an output being written inside its input), with its
            resumable state.
    """
    root = Path(root)
    skip_path = Path(os.path.abspath(skip)) if skip is not None else None
    names = _tree_files(root, skip_hidden=skip_hidden, skip=skip_path)
    return {rel: file_record(root / rel) for rel in names}


def _input_record(path: str, skip: Path | None) -> dict[str, Any]:
    if os.path.isdir(path):
        return {"path": path, "files": tree_records(path, skip_hidden=True, skip=skip)}
    if os.path.isfile(path):
        return {"path": path, **file_record(path)}
    raise WeightkitError(f"input {path} is neither a file nor a directory: it cannot be checksummed")


@dataclass(frozen=True)
class Provenance:
    """What made an output: given to :class:`~weightkit.checkpoint.writer.CheckpointWriter`, which writes
    it into the output's manifest.

    Attributes:
        verb: the weightkit command (``"merge"``, ``"compress"``, ``"adapt"``, ``"export"`` ...).
        method: the method it ran (``"ties"``, ``"gptq"``, ``"lora"`` ...).
        config: the full configuration, JSON-ready: ``config_to_dict(config)`` of the method's config, or
            the recipe, plus what else decides the result (training settings, seeds), so the run can be
            repeated from the manifest alone.
        inputs: the files and directories the run read (models, adapters, data files, recipes); made
            absolute so that ``weightkit verify --inputs`` finds them from any directory.
    """

    verb: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    _records: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            json.dumps(self.config, allow_nan=False)
        except (TypeError, ValueError) as err:
            # A programming error, not bad input: every caller converts its config with config_to_dict.
            raise TypeError(f"the {self.verb} {self.method} config is not plain JSON: {err}") from None
        absolute = tuple(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in self.inputs))
        object.__setattr__(self, "inputs", absolute)

    def input_records(self, skip: str | None = None) -> list[dict[str, Any]]:
        """Each input's path with its checksums (a directory: every file under it, see the module
        docstring; ``skip``: the absolute path of the output, left out of an input directory that holds
        it). Computed once per ``Provenance`` (a training run's checkpoints, each at its own path, reuse
        the first's).

        Raises:
            WeightkitError: an input is no longer a file or directory.
        """
        if skip is not None and not any(Path(skip).is_relative_to(path) for path in self.inputs):
            skip = None  # the output lies inside no input: its path does not change the records
        if skip not in self._records:
            skip_path = Path(skip) if skip is not None else None
            self._records[skip] = [_input_record(path, skip_path) for path in self.inputs]
        return self._records[skip]


def data_files(*sources: Any) -> tuple[str, ...]:
    """The ``sources`` that name a local file or directory (a calibration or training data argument may
    also be None for the default corpus, or a list of texts: those read no file)."""
    return tuple(os.fspath(s) for s in sources if isinstance(s, str | os.PathLike) and os.path.exists(s))


def build_manifest(
    provenance: Provenance, directory: str | os.PathLike, *, target: str | None = None
) -> dict:
    """The manifest of the output being written in ``directory``: ``provenance``, its inputs' checksums
    and those of every file in ``directory`` (the manifest itself excepted).

    Args:
        provenance: what made the output.
        directory: where the output's files are (the writer's temporary directory).
        target: the absolute path the output will be published at, left out of input directories that
            contain it.
    """
    from weightkit import __version__

    return {
        "manifest_version": _MANIFEST_VERSION,
        "weightkit_version": __version__,
        "verb": provenance.verb,
        "method": provenance.method,
        "config": provenance.config,
        "inputs": provenance.input_records(target),
        "files": tree_records(directory),
    }


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest`` as ``directory/weightkit_manifest.json``, keys in the order built (every part is
    built in a fixed order, so the same run gives the same bytes)."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _inside(rel: Any) -> bool:
    """Whether ``rel`` is a normalised relative path that stays inside its directory: a manifest from a
    stranger must not make verify read files elsewhere (``../../home/...``, ``/dev/zero``)."""
    if not isinstance(rel, str) or not rel:
        return False
    path = PurePosixPath(rel)
    return not path.is_absolute() and ".." not in path.parts and path.as_posix() == rel


def _records_ok(files: Any) -> bool:
    return isinstance(files, dict) and all(
        _inside(rel) and _record_ok(record) for rel, record in files.items()
    )


def _record_ok(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("size"), int)
        and not isinstance(record.get("size"), bool)
    )


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of ``directory``, its structure checked.

    Raises:
        WeightkitError: ``directory`` is not a directory, has no manifest, or its manifest is not valid
            JSON of the expected shape (the message names the file and what is wrong).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightkitError(f"{directory} is not a directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise WeightkitError(
            f"{directory} has no {MANIFEST_NAME}: it was not written by weightkit (or by a version before "
            "manifests), so there is nothing to verify it against"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightkitError(f"{path} is corrupt: not valid UTF-8 JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise WeightkitError(f"{path} is corrupt: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("manifest_version") != _MANIFEST_VERSION:
        raise WeightkitError(
            f"{path}: manifest_version {manifest.get('manifest_version')!r} is not one this weightkit "
            f"reads ({_MANIFEST_VERSION})"
        )
    if not _records_ok(manifest.get("files")):
        raise WeightkitError(
            f"{path} is corrupt: 'files' must map relative paths inside the directory to {{sha256, size}}"
        )
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list) or not all(
        isinstance(item, dict)
        and isinstance(item.get("path"), str)
        and (_records_ok(item.get("files")) if "files" in item else _record_ok(item))
        for item in inputs
    ):
        raise WeightkitError(
            f"{path} is corrupt: 'inputs' must list {{path, files}} or {{path, sha256, size}}"
        )
    return manifest


@dataclass(frozen=True)
class Finding:
    """One difference between a directory and its manifest.

    Attributes:
        path: the file: relative to the output directory for outputs, absolute for inputs.
        status: ``"changed"``, ``"missing"`` (listed, not there), ``"added"`` (there, not listed) or, for
            an input path that no longer exists at all, ``"not found"``.
        expected, actual: the sha256 recorded and found (None where there is none).
    """

    path: str
    status: str
    expected: str | None = None
    actual: str | None = None

    @property
    def failure(self) -> bool:
        """Whether the finding fails verification: everything but an input that is gone altogether."""
        return self.status != "not found"


def _compare(
    root: Path, recorded: dict[str, dict], present: list[str], name: Callable[[str], str], progress: bool
) -> list[Finding]:
    findings = []
    for rel in track(sorted(recorded), f"verifying {root.name}", enabled=progress):
        path = root / rel
        expected = recorded[rel]["sha256"]
        if not path.is_file():
            findings.append(Finding(name(rel), "missing", expected=expected))
            continue
        # A different size is a change without reading the file.
        same_size = os.path.getsize(path) == recorded[rel]["size"]
        actual = sha256_file(path) if same_size else None
        if actual != expected:
            findings.append(Finding(name(rel), "changed", expected=expected, actual=actual))
    findings += [Finding(name(rel), "added") for rel in present if rel not in recorded]
    return findings


def check_outputs(directory: str | os.PathLike, manifest: dict, *, progress: bool = False) -> list[Finding]:
    """Re-hash every file ``manifest`` lists in ``directory``: the files changed (sha256 differs), missing,
    or added since (every file but the manifest counts, hidden ones too).
    A file whose size differs is reported changed with ``actual`` None (it is not read)."""
    root = Path(directory)
    present = _tree_files(root, skip_hidden=False)
    return _compare(root, manifest["files"], present, lambda rel: rel, progress)


def check_inputs(manifest: dict, directory: str | os.PathLike, *, progress: bool = False) -> list[Finding]:
    """Re-hash the inputs ``manifest`` (that of the output ``directory``) records that still exist at their
    paths.

    An input path that no longer exists is one ``"not found"`` finding (not a failure: inputs are often
    moved or deleted after a run). An input that exists but differs fails: a changed file; and in an input
    directory, files missing or added (hidden files and ``directory`` itself aside, as when it was recorded).
    """
    output = Path(os.path.abspath(directory))
    findings = []
    for item in manifest["inputs"]:
        path = Path(item["path"])
        if "files" in item:
            if not path.is_dir():
                findings.append(Finding(item["path"], "not found"))
                continue
            present = _tree_files(path, skip_hidden=True, skip=output)
            findings += _compare(
                path, item["files"], present, lambda rel, p=path: (p / rel).as_posix(), progress
            )
        elif not path.is_file():
            findings.append(Finding(item["path"], "not found"))
        else:
            findings += _compare(path.parent, {path.name: item}, [], lambda rel, p=path: p.as_posix(), False)
    return findings


def summarize(findings: Iterable[Finding]) -> str:
    """``"model.safetensors changed, tokenizer.json missing"``: the failures, in order."""
    return ", ".join(f"{f.path} {f.status}" for f in findings if f.failure)
