"""Progress bars and messages on stderr, so stdout stays clean for tables and JSON."""

from __future__ import annotations

import warnings
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
from rich.table import Column
from rich.text import Text

from cnncodes.core.errors import CnnCodesWarning

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, the number users compare between backbones and runtimes; never wrapped.

    Args:
        unit: what is counted ("img", "batch", "model").
    """

    def __init__(self, unit: str):
        super().__init__(table_column=Column(no_wrap=True))
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


class DescriptionColumn(ProgressColumn):
    """The task's description on one line: on a narrow terminal it, and the bar, give way to the numbers."""

    def render(self, task: Task) -> Text:
        return Text(task.description, no_wrap=True, overflow="ellipsis")


# Columns of a progress line: the spaces between its seven columns, the narrowest bar and description shown.
_GAPS, _MIN_BAR, _MIN_TEXT = 6, 3, 12


@contextmanager
def progress_bar(
    description: str, total: int, unit: str = "img", enabled: bool = True, completed: int = 0
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; shows a bar with count, rate and ETA when `enabled`."""
    if not enabled:
        yield _ignore
        return
    # The bar gives way first, then the description's end (cut with an ellipsis), so the numbers keep their room.
    numbers = len(f"{total}/{total} 999.9 {unit}/s 0:00:00 ETA 0:00:00") + _GAPS
    room = max(_MIN_TEXT, console.width - numbers - _MIN_BAR)
    columns = (
        DescriptionColumn(table_column=Column(no_wrap=True, max_width=room)),
        BarColumn(bar_width=None),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        RateColumn(unit),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        TextColumn("ETA", table_column=Column(no_wrap=True)),
        TimeRemainingColumn(table_column=Column(no_wrap=True)),
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
    """Something the user should know even with --quiet, raised as a `CnnCodesWarning`.

    Args:
        message: one complete sentence: what happened and, where it helps, what to do.
    """
    warnings.warn(message, CnnCodesWarning, stacklevel=2)


@contextmanager
def warnings_on_console() -> Iterator[None]:
    """Within it, every `CnnCodesWarning` prints as one "Warning: …" line on stderr, each time it is raised.

    The CLI runs every command inside it; a notebook sees Python's usual warnings instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", CnnCodesWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
            if issubclass(category, CnnCodesWarning):
                said = message.args[0] if isinstance(message, CnnCodesWarning) else str(message)  # the CLI's words
                console.print(f"[yellow]Warning:[/] {escape(said)}", highlight=False, soft_wrap=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
