"""Terminal presentation for the CLI: stderr progress and stdout writing.

Progress is drawn only when stderr is a terminal and --quiet is off, so that
logs and pipelines never receive control characters.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


def stderr_console() -> Console:
    """A rich console bound to stderr."""
    return Console(file=sys.stderr, stderr=True)


def interactive(quiet: bool) -> bool:
    """True when progress may be drawn: stderr is a TTY and --quiet is off."""
    return not quiet and sys.stderr.isatty()


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="cyan")


class _Count(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{int(task.completed):,}/{int(task.total or 0):,} tokens", style="green")


@contextlib.contextmanager
def encode_progress(quiet: bool, label: str = "Encoding") -> Iterator[Callable[[int, int], None] | None]:
    """Yield a progress(done, total) callback drawing a bar on stderr, or None."""
    if not interactive(quiet):
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), _Count(), _Rate(),
                  TimeRemainingColumn(), console=stderr_console(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def status(message: str, quiet: bool) -> Iterator[None]:
    """A spinner on stderr while something slow (model loading) runs."""
    if not interactive(quiet):
        yield
        return
    with stderr_console().status(message):
        yield


def write_stdout(text: str) -> None:
    """Write to stdout immediately (streaming)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so exit-time flushes stay quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


class _UnitCount(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{int(task.completed):,}/{int(task.total or 0):,} {self.unit}", style="green")


class TaskProgress:
    """progress(done, total) callback drawing a rich bar on stderr, started by the first call.

    Lazy, so that a bar asked for "in case" (PDF pages while reading any file) never shows
    up when nothing reports progress.
    """

    def __init__(self, label: str, unit: str) -> None:
        self.label, self.unit = label, unit
        self.bar: Progress | None = None
        self.task_id = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            columns: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn(),
                                             _UnitCount(self.unit)]
            if self.unit == "tokens":
                columns.append(_Rate())
            columns.append(TimeRemainingColumn())
            self.bar = Progress(*columns, console=stderr_console(), transient=True)
            self.bar.start()
            self.task_id = self.bar.add_task(self.label, total=None)
        self.bar.update(self.task_id, completed=done, total=total)

    def describe(self, label: str) -> None:
        """Replace the bar's label (e.g. 'Encoding (notes 3/12)')."""
        self.label = label
        if self.bar is not None:
            self.bar.update(self.task_id, description=label)

    def close(self) -> None:
        """Remove the bar, if it was ever drawn."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@contextlib.contextmanager
def task_progress(quiet: bool, label: str, unit: str = "tokens") -> Iterator[TaskProgress | None]:
    """Like encode_progress, for any unit (pages, tokens), with a changeable label; None when not drawn."""
    if not interactive(quiet):
        yield None
        return
    progress = TaskProgress(label, unit)
    try:
        yield progress
    finally:
        progress.close()
