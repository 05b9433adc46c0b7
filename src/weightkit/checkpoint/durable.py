"""Making written files and directories durable: on disk before anything refers to them."""

import os
from pathlib import Path

__all__ = ["fsync", "fsync_tree"]


def fsync(path: Path) -> None:
    """Flush the file or directory ``path`` to disk."""
    # Data must be on disk before the rename publishes it, or a power cut could leave a complete-looking
    # directory of empty files. Directories are fsynced too so the renames themselves are durable.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first) under ``root``, ``root`` included."""
    for directory, _, files in os.walk(root, topdown=False):
        for file in files:
            fsync(Path(directory, file))
        fsync(Path(directory))
