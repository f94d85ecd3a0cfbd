"""What the CLI writes: content on stdout, one-line errors and notices and progress on stderr.

Progress is drawn only when stderr is a terminal and --quiet is off, so that
logs and pipelines never receive control characters.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
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


# Characters that a terminal may act on instead of showing: C0 controls (ESC starts
# CSI/OSC sequences that can clear the screen, retitle the window, or on some
# terminals write files), DEL, the C1 controls U+0080-U+009F (U+009B is a one-character
# CSI for terminals that honour 8-bit controls), and the bidirectional overrides and
# isolates that make text read differently from what it is ("Trojan source").
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000))})
# Lone surrogates U+DC80-U+DCFF are how Python carries bytes that are not UTF-8 in file
# names and arguments (surrogateescape): shown as the byte they stand for.  Written raw,
# they would make a UTF-8 stream raise (UnicodeEncodeError) instead of printing.
_ESCAPES.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})
_LAYOUT_TABLE = {c: e for c, e in _ESCAPES.items() if chr(c) not in "\t\n"}
_JSON_TABLE = {c: f"\\u{c:04x}" for c in _ESCAPES if c >= 0x7F}  # surrogates too: JSON escapes them as such


def printable(text: str, keep_layout: bool = True) -> str:
    """Untrusted text made safe to echo to a terminal: control characters shown as \\xNN.

    Tab and newline stay as they are unless keep_layout is False (one-line contexts).
    Everything else is left alone, so ordinary text (any script, emoji) is unchanged and
    applying it twice changes nothing more.
    """
    return text.translate(_LAYOUT_TABLE if keep_layout else _ESCAPES)


def printable_json(text: str) -> str:
    """A JSON document with DEL, C1 controls and bidi overrides written as \\u escapes.

    json.dumps(ensure_ascii=False) already escapes C0 controls, but leaves these raw;
    inside JSON they can only occur in strings, where \\uXXXX means the same character,
    so the JSON still decodes to identical values.
    """
    return text.translate(_JSON_TABLE)


def write_stdout(text: str) -> None:
    """Write to stdout immediately (streaming).

    On a terminal, control characters are shown escaped: generated text comes from a
    model that read an untrusted document and can be steered to emit ESC sequences.
    Pipes and files get the text exactly as generated, since a program reading it
    should see what the model wrote (and no terminal interprets it there).
    """
    if sys.stdout.isatty():
        text = printable(text)
    sys.stdout.write(text)
    sys.stdout.flush()


def silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so exit-time flushes stay quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _bar_label(label: str) -> str:
    """A label that may name a file, safe as the rich markup the bar's text column renders."""
    from rich.markup import escape

    return escape(printable(label, keep_layout=False))


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
        self.label, self.unit = _bar_label(label), unit
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
        self.label = label = _bar_label(label)
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
    """A message on one line: runs of whitespace (newlines too) become one space.

    Messages quote file names, header fields and option values, all untrusted: shown
    escaped, so an error about a hostile file cannot move the cursor or clear the screen.
    """
    return printable(" ".join(message.split()), keep_layout=False)


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
    except (MemoryError, RuntimeError) as exc:
        # What memory.check_fits cannot foresee (activations, a model larger than free memory)
        # still ends in one line: torch reports a failed allocation as a RuntimeError.
        if not _out_of_memory(exc):
            raise
        typer.echo(f"lminf: error: out of memory ({one_line(str(exc))[:200]}); try a smaller --chunk-size, "
                   "--n-local or model", err=True)
        raise typer.Exit(2) from None


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "out of memory" in text or "can't allocate memory" in text)


def note(message: str, quiet: bool = False) -> None:
    """A notice on stderr (`lminf: ...`), unless quiet; what it quotes from files is shown escaped."""
    if not quiet:
        typer.echo(f"lminf: {printable(message)}", err=True)


def emit_json(obj: dict[str, Any]) -> None:
    """One JSON object on one stdout line (DEL, C1 and bidi controls from files written escaped)."""
    write_stdout(printable_json(json.dumps(obj, ensure_ascii=False)) + "\n")


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


class EncodeNotice:
    """A progress(done, total) callback that says once, on stderr, how long a long encode will take.

    Long means over LONG_WINDOWS windows of tokens and an expected time of at least
    NOTICE_SECONDS (short ones would only add noise).  With a speed measured on an
    earlier run the line comes before the first chunk; without one, after the first
    few seconds of this encode, at the speed seen so far.  `inner` (a drawn bar, or
    None) gets every call.
    """

    LONG_WINDOWS = 4
    NOTICE_SECONDS = 10.0
    MEASURE_SECONDS = 3.0

    def __init__(self, inner: Callable[[int, int], None] | None, quiet: bool, window: int,
                 known_speed: float | None, clock: Callable[[], float] | None = None) -> None:
        import time

        self.inner, self.quiet, self.window, self.known = inner, quiet, window, known_speed
        self.clock = clock or time.monotonic
        self.start: tuple[float, int] | None = None
        self.done = quiet  # nothing to say with --quiet

    def __call__(self, done: int, total: int) -> None:
        if self.inner is not None:
            self.inner(done, total)
        if self.done or total <= self.LONG_WINDOWS * self.window:
            return
        now = self.clock()
        if self.start is None:
            self.start = (now, done)
        speed, how = self.known, "measured on this machine"
        if speed is None:
            elapsed, read = now - self.start[0], done - self.start[1]
            if elapsed < self.MEASURE_SECONDS or read <= 0:
                return
            speed, how = read / elapsed, "so far"
        self.done = True
        remaining = (total - done) / speed
        if remaining >= self.NOTICE_SECONDS:
            from ..speed import format_duration

            sys.stderr.write(f"lminf: encoding {total:,} tokens: about {format_duration(remaining)} at "
                             f"{speed:,.0f} tokens/s ({how})\n")
            sys.stderr.flush()


def until_first(pieces: Iterator[str], message: str, quiet: bool) -> Iterator[str]:
    """The pieces, with a spinner on stderr until the first one arrives (encoding a prompt and
    the first token can take a while, and silence reads as a hang)."""
    spinner = stderr_console().status(message) if interactive(quiet) else None
    if spinner is not None:
        spinner.start()
    try:
        for piece in pieces:
            if spinner is not None:
                spinner.stop()
                spinner = None
            yield piece
    finally:
        if spinner is not None:
            spinner.stop()
        close = getattr(pieces, "close", None)
        if close is not None:  # left early: let the source clean up now (a reply restores its state)
            close()


def stats_fields(metrics: Any, first_token_seconds: float | None, load_seconds: float | None = None) -> dict[str, Any]:
    """The numbers of `--verbose` and of `--json`'s "stats": what was encoded and generated, how fast,
    the time to the first token, peak memory (GenerationMetrics of the reply; times in seconds)."""
    def rate(n: int, s: float) -> float | None:
        return round(n / s, 2) if s > 0 else None

    out: dict[str, Any] = {}
    if load_seconds is not None:
        out["load_seconds"] = round(load_seconds, 3)
    out.update({
        "prompt_tokens": metrics.prompt_tokens, "prompt_seconds": round(metrics.encode_seconds, 3),
        "prompt_tps": rate(metrics.prompt_tokens, metrics.encode_seconds),
        "ttft_seconds": None if first_token_seconds is None else round(first_token_seconds, 3),
        "generated_tokens": metrics.generated_tokens, "generation_seconds": round(metrics.decode_seconds, 3),
        "generation_tps": rate(metrics.generated_tokens, metrics.decode_seconds),
        "peak_memory_bytes": metrics.peak_memory_bytes,
    })
    return out


def print_stats(stats: dict[str, Any]) -> None:
    """`--verbose`: the stats on stderr, one figure a line (as ollama --verbose and mlx_lm print them)."""
    from ..units import human_bytes

    def rate(v: float | None) -> str:
        return f" ({v:,.1f} tok/s)" if v else ""

    lines = []
    if "load_seconds" in stats:
        lines.append(f"model load:    {stats['load_seconds']:.2f} s")
    lines.append(f"prompt:        {stats['prompt_tokens']:,} tokens in {stats['prompt_seconds']:.2f} s"
                 + rate(stats["prompt_tps"]))
    if stats["ttft_seconds"] is not None:
        lines.append(f"first token:   after {stats['ttft_seconds']:.2f} s")
    lines.append(f"generated:     {stats['generated_tokens']:,} tokens in {stats['generation_seconds']:.2f} s"
                 + rate(stats["generation_tps"]))
    lines.append(f"peak memory:   {human_bytes(stats['peak_memory_bytes'])}")
    for line in lines:
        typer.echo(f"lminf: {line}", err=True)


def finish_note(reason: str | None, max_new_tokens: int | None, quiet: bool) -> None:
    """Say on stderr why a reply ended when it did not end by itself: it looped, or the default
    token budget cut it (`max_new_tokens`: that budget; None when the user chose it with -n)."""
    if reason == "loop":
        note("the reply began repeating itself: it ends at its last complete sentence", quiet)
    elif reason == "length" and max_new_tokens is not None:
        note(f"the reply was cut at {max_new_tokens} tokens (-n/--max-new-tokens allows more)", quiet)
