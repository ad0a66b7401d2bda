"""Progress bars: one rich bar per task, in a terminal and in a Jupyter notebook alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


@contextmanager
def rich_progress(console: Console | None = None) -> Iterator:
    """A progress callback ``(task, advance, total)`` drawing one rich bar per task on
    ``console`` (by default a new one, which draws a widget in a notebook)."""
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or Console(),
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def update(task: str, advance: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total)
        bars.update(tasks[task], advance=advance)

    with bars:
        yield update
