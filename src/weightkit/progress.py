"""Progress bars for long work (rich), silent when asked to be (``--json``, tests, libraries)."""

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["track", "console", "results"]

T = TypeVar("T")

# Progress, logs and errors go to stderr; a command's results (its tables and summary lines) to stdout,
# so `weightkit eval ... > result.txt` keeps the result and --json's stdout holds the JSON alone.
console = Console(stderr=True)
results = Console()


def track(
    items: Iterable[T], description: str, *, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Yield ``items`` while showing a progress bar (a no-op wrapper when ``enabled`` is False)."""
    if not enabled:
        yield from items
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.advance(task)
