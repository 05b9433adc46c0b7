"""Which process owns a directory that a weightkit run writes, and whether that process still runs.

A run killed with SIGKILL (or by the kernel's OOM killer, or a power cut) cannot clean up after itself:
its temporary directory stays behind. The next run for the same output removes it, but only if its owner
is dead: a second run writing the same output at the same time must not lose its work. A process id alone
cannot say so, as the kernel reuses ids; a process is identified by its id, its start time (in clock
ticks since boot, from ``/proc/<pid>/stat``) and the boot it ran in (``/proc/sys/kernel/random/boot_id``),
so neither a recycled id nor a reboot is mistaken for the owner. Where ``/proc`` does not exist (macOS),
only the id is known, and a process with that id is taken to be the owner: a stale directory may then stay
until the id is free, never the reverse.
"""

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "OWNER_FILE",
    "current_owner",
    "interrupts_held",
    "owner_alive",
    "process_owner",
    "read_owner",
    "write_owner",
]


# The owner record in a writer's temporary directory. It stays there until the directory is published (a
# kill at any moment before leaves a record to judge it by) and is removed just after; integrity manifests
# never list it.
OWNER_FILE = ".weightkit-owner"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None when /proc has no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2, in parentheses) may itself hold spaces and parentheses.
    return int(stat.rpartition(")")[2].split()[19])


def process_owner(pid: int) -> dict[str, Any]:
    """Process ``pid`` as an owner record: ``{"pid", "boot", "start"}`` (``boot`` and ``start`` None
    without /proc)."""
    return {"pid": pid, "boot": _boot_id(), "start": _start_time(pid)}


def current_owner() -> dict[str, Any]:
    """This process as an owner record (see :func:`process_owner`)."""
    return process_owner(os.getpid())


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process ``owner`` (from :func:`current_owner`) still runs."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if owner.get("boot") is not None and _boot_id() is not None:
        if owner["boot"] != _boot_id():
            return False  # it ran before the last reboot
        start = _start_time(pid)
        return start is not None and start == owner.get("start")
    try:  # no /proc: the id is all there is to go by
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds the id
    return True


def write_owner(path: Path) -> None:
    """Record this process as the owner, in the file ``path``."""
    path.write_text(json.dumps(current_owner()) + "\n", encoding="utf-8")


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner recorded in ``path``, or None when there is no readable record (no file, or one cut short
    by a kill while it was written)."""
    with contextlib.suppress(OSError, ValueError):
        owner = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(owner, dict):
            return owner
    return None


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver them.

    For making a directory and recording its owner in it: a ``KeyboardInterrupt`` between the two would
    leave a directory without an owner, which no later run may remove. Only the main thread receives
    signals, and only where the OS can hold them (not Windows); elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
