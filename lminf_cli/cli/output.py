"""What the CLI writes: content on stdout, one-line errors and notices and progress on stderr.

Progress is drawn only when stderr is a terminal and --quiet is off, so that
logs and pipelines never receive control characters.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from ..errors import LminfError, SettingsError


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
    """A progress(done, total) callback drawing a bar on stderr (any unit: pages, tokens), with a
    changeable label; None when progress is not drawn (--quiet, or stderr is not a terminal)."""
    if not interactive(quiet):
        yield None
        return
    progress = TaskProgress(label, unit)
    try:
        yield progress
    finally:
        progress.close()


def one_line(message: str) -> str:
    """A message on one line: runs of whitespace (newlines too) become one space."""
    return " ".join(message.split())


def error_line(exc: LminfError) -> str:
    """The stderr line for an error; a setting is named by the option that sets it."""
    if isinstance(exc, SettingsError):
        return f"lminf: error: --{exc.setting.replace('_', '-')} {one_line(exc.detail)}"
    return f"lminf: error: {one_line(str(exc))}"


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn domain errors into one stderr line + exit 2, and a closed stdout into a quiet exit."""
    try:
        yield
    except LminfError as exc:
        typer.echo(error_line(exc), err=True)
        raise typer.Exit(exc.exit_code) from None
    except BrokenPipeError:
        silence_stdout()
        raise typer.Exit(141) from None


def note(message: str, quiet: bool = False) -> None:
    """A notice on stderr (`lminf: ...`), unless quiet."""
    if not quiet:
        typer.echo(f"lminf: {message}", err=True)


def emit_json(obj: dict[str, Any]) -> None:
    """One JSON object on one stdout line."""
    write_stdout(json.dumps(obj, ensure_ascii=False) + "\n")


def stream_text(pieces: Iterator[str]) -> None:
    """Stream text to stdout without leading or trailing whitespace, ending with one newline.

    Whitespace is held back until more text follows it, so a reply that ends in blank
    lines prints none of them.
    """
    wrote, pending = False, ""
    for piece in pieces:
        if not wrote:
            piece = piece.lstrip()
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body):]
        if body:
            write_stdout(body)
            wrote = True
    write_stdout("\n")


def stdout_console() -> Console:
    """A rich console on stdout, wide enough for tables when stdout is not a terminal (files, pipes, tests)."""
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
