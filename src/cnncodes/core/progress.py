"""Progress bars and messages on stderr, so stdout stays clean for tables and JSON."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, the number users compare between backbones and runtimes."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(
    description: str, total: int, unit: str = "img", enabled: bool = True, completed: int = 0
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; shows a bar with count, rate and ETA when `enabled`."""
    if not enabled:
        yield _ignore
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        yield advance


def _ignore(n: int = 1) -> None:
    """`advance` when no bar is shown."""


def say(message: str) -> None:
    console.print(message, highlight=False)


def warn(message: str) -> None:
    """Something the user should know even with --quiet."""
    console.print(f"[yellow]Warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
