"""The resumable state of an unfinished run: ``<OUT>.partial/`` beside the output ``OUT``.

A long merge or compression writes its finished units (output shards, calibrated blocks) into
``<OUT>.partial/`` and records each one in ``state.json`` once its file is on disk (fsynced), by rewriting
the state file atomically. If the run dies (Ctrl-C, SIGKILL, a full disk), the same command with
``--resume`` reads the state, checks that it is the same run, and continues after the last recorded unit;
a unit whose file was written but not recorded is simply made again. The directory is removed once the
output is published.

The state records the run's settings (everything its output depends on) and a fingerprint of its
inputs: the size and modification time (ns) of every file of every input. Sizes and times, not
checksums: hashing a 7B model's 14 GB would cost about a minute at every start and resume, while any
re-download, copy or edit of a file changes its time. An edit that restores the old time on purpose is
not seen.

The directory never holds a ``config.json`` at its top, so no tool mistakes it for a model.
"""

import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from weightkit.checkpoint.durable import fsync
from weightkit.checkpoint.files import tree_files
from weightkit.checkpoint.owner import interrupts_held, owner_alive, read_owner, write_owner
from weightkit.errors import WeightkitError

__all__ = ["PartialRun", "input_fingerprint", "partial_path"]

STATE = "state.json"
_OWNER = "owner.json"
_FORMAT = 1


def partial_path(out_dir: str | os.PathLike) -> Path:
    """Where the resumable state of a run writing ``out_dir`` lives: ``<out_dir>.partial``."""
    out = Path(os.path.abspath(out_dir))
    return out.with_name(out.name + ".partial")


def input_fingerprint(
    inputs: list[str | os.PathLike], *, exclude: tuple[Path, ...] = ()
) -> dict[str, list[int] | None]:
    """``{absolute path: [size, mtime_ns]}`` of every input file, and of every file under every input
    directory (hidden ones and those under ``exclude`` left out); a path that does not exist maps to None."""
    found: dict[str, list[int] | None] = {}

    def record(path: str) -> None:
        stat = os.stat(path)
        found[path] = [stat.st_size, stat.st_mtime_ns]

    for given in inputs:
        path = os.path.abspath(given)
        if os.path.isfile(path):
            record(path)
        elif os.path.isdir(path):
            for rel in tree_files(Path(path), skip_hidden=True, skip=exclude):
                record(os.path.join(path, rel))
        else:
            found[path] = None
    return found


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from the state file (tuples become lists, paths and dtypes strings)."""
    return json.loads(json.dumps(value, default=str))


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"method.density": 0.5, ...}``, so a refusal names the very value that differs."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


class PartialRun:
    """The state of a resumable run writing ``out_dir``, in ``<out_dir>.partial/``.

    Used as a context manager around the run: it is created (or, with ``resume``, checked and taken over)
    on construction; on Ctrl-C it is kept and the ``KeyboardInterrupt`` says how to continue; on a failure
    of the machine (an ``OSError`` such as a full disk, or a ``MemoryError``, raised or as the cause of
    the error raised) it is kept when it holds a finished unit, to be resumed once space or memory is
    freed; on any other error (bad input) it is removed. Whoever publishes the output calls
    :meth:`remove` once it is in place.

    Args:
        out_dir: the output the run makes.
        settings: everything the output depends on, JSON-ready; a resumed run must give the same.
        inputs: the input files and directories, fingerprinted (see the module docstring).
        resume: continue the run recorded in ``<out_dir>.partial``; False refuses to start while one
            exists (it would be lost).
        unit: what one unit is called in messages ("shard", "block").

    Raises:
        WeightkitError: without ``resume``, the directory exists; with ``resume``, it does not exist, is
            in use by a live run, is unreadable, or records other settings or inputs (the message names
            the first setting or file that differs).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        settings: dict[str, Any],
        inputs: list[str | os.PathLike],
        resume: bool,
        unit: str,
    ):
        self.path = partial_path(out_dir)
        self.unit = unit
        out = self.path.with_name(self.path.name.removesuffix(".partial"))
        fingerprint = input_fingerprint(inputs, exclude=(out, self.path))
        self._state: dict[str, Any] = {
            "format": _FORMAT,
            "settings": _json_ready(settings),
            "inputs": fingerprint,
            "units": [],
            "bound": {},  # see require
        }
        self._saved_bound: dict[str, Any] = {}
        if resume:
            self._take_over()
        elif self.path.exists():
            raise WeightkitError(
                f"{self.path} holds an unfinished run of {out}: run the same command with --resume to "
                f"continue it, or delete {self.path} to start again"
            )
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with interrupts_held():  # never a directory without its state
                    self.path.mkdir()
                    write_owner(self.path / _OWNER)
                    self._save()
            except OSError as err:
                raise WeightkitError(f"cannot create {self.path}: {err.strerror or err}") from err
            except KeyboardInterrupt:  # held during the block, delivered as it ended
                raise KeyboardInterrupt(self._how_to_continue()) from None

    def _take_over(self) -> None:
        if not self.path.is_dir():
            raise WeightkitError(f"nothing to resume: {self.path} does not exist; run without --resume")
        owner = read_owner(self.path / _OWNER)
        if owner is not None and owner.get("pid") != os.getpid() and owner_alive(owner):
            raise WeightkitError(f"{self.path} is in use by another weightkit run (process {owner['pid']})")
        try:
            saved = json.loads((self.path / STATE).read_text(encoding="utf-8"))
            units = saved["units"]
            recorded = [(self.file(unit["file"]), int(unit["size"])) for unit in units]
        except (OSError, ValueError, KeyError, TypeError, WeightkitError):
            raise WeightkitError(
                f"cannot resume from {self.path}: its {STATE} is missing or unreadable; delete {self.path} "
                "and run without --resume"
            ) from None
        if saved.get("format") != _FORMAT:
            raise WeightkitError(
                f"cannot resume from {self.path}: it was written by another weightkit version (state format "
                f"{saved.get('format')!r}, this one reads {_FORMAT}); delete it and run without --resume"
            )
        self._compare("setting", _flat(saved.get("settings") or {}), _flat(self._state["settings"]))
        self._compare("input file", saved.get("inputs") or {}, self._state["inputs"])
        for file, size in recorded:
            if not file.is_file() or file.stat().st_size != size:
                raise WeightkitError(
                    f"cannot resume from {self.path}: {file.name} is missing or not the size recorded "
                    f"({size} bytes); delete {self.path} and run without --resume"
                )
        self._state["units"] = units
        self._saved_bound = saved.get("bound") or {}
        self._state["bound"] = dict(self._saved_bound)
        write_owner(self.path / _OWNER)

    def _compare(self, what: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
        for key in [*saved, *(k for k in current if k not in saved)]:
            if saved.get(key) != current.get(key):
                if what == "input file":
                    change = "is gone" if current.get(key) is None else "has changed (size or time)"
                    change = "is new" if saved.get(key) is None else change
                    detail = f"input file {key} {change} since the run started"
                else:
                    detail = (
                        f"it was started with {key} = {_describe(saved.get(key))}, this run has "
                        f"{_describe(current.get(key))}"
                    )
                raise WeightkitError(
                    f"cannot resume from {self.path}: {detail}; run the same command as before, or delete "
                    f"{self.path} and run without --resume"
                )

    def require(self, key: str, value: Any) -> None:
        """Record one more setting the output depends on, given by whoever writes it rather than by the
        caller (the writer's shard layout); when resuming, refuse another value than the run had."""
        value = _json_ready(value)
        bound = self._state["bound"]
        if key in self._saved_bound:
            self._compare("setting", _flat({key: self._saved_bound[key]}), _flat({key: value}))
        bound[key] = value
        self._save()

    @property
    def units(self) -> list[dict[str, Any]]:
        """The finished units, in order: each ``{"file": name in the directory, "size": bytes, ...}``."""
        return list(self._state["units"])

    def file(self, name: str) -> Path:
        """The path of the unit file ``name`` in the directory (a plain file name: the state file names
        nothing outside the directory)."""
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise WeightkitError(f"{name!r} is not a file name inside {self.path}")
        return self.path / name

    def journal(self, unit: dict[str, Any]) -> None:
        """Record a finished unit whose file (``unit["file"]``) is written and fsynced; its size is checked
        on resume. The state file is replaced atomically, so a kill leaves the old state or the new one."""
        unit = {**unit, "size": self.file(unit["file"]).stat().st_size}
        self._state["units"].append(_json_ready(unit))
        self._save()

    def _save(self) -> None:
        tmp = self.path / f".{STATE}.tmp"
        try:
            tmp.write_text(json.dumps(self._state, indent=1) + "\n", encoding="utf-8")
            fsync(tmp)
            os.replace(tmp, self.path / STATE)
            fsync(self.path)
        except OSError as err:
            raise WeightkitError(f"writing {self.path / STATE} failed: {err}") from err

    def remove(self) -> None:
        """Delete the directory: the output it was for is published."""
        shutil.rmtree(self.path, ignore_errors=True)

    def _how_to_continue(self) -> str:
        done = len(self._state["units"])
        kept = f"after {self.unit} {done}, kept in {self.path}" if done else f"before {self.unit} 1"
        return f"{kept}; run the same command with --resume to continue from {self.unit} {done + 1}"

    def __enter__(self) -> "PartialRun":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            return
        done = len(self._state["units"])
        if issubclass(exc_type, KeyboardInterrupt):
            raise KeyboardInterrupt(self._how_to_continue()) from None
        # A failure of the machine (a full disk, an I/O error, memory) can be fixed and the run resumed; a
        # failure of the inputs (a NaN weight, a bad shape) would only stop the resumed run again.
        machine = (OSError, MemoryError)
        if not done or not (isinstance(exc, machine) or isinstance(getattr(exc, "__cause__", None), machine)):
            self.remove()
