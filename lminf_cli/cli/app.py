"""The `lminf` command line: the Typer app, error handling and the entry point.

stdout carries only content (generated text, tables asked for); everything else goes to
stderr.  Every failure the user can fix becomes one line `lminf: error: ...` on stderr and
exit code 2; Ctrl-C exits 130.  The commands live in their own modules (generate,
documents, evaluate, bench), each parsing + one call of the Python API + printing; they
register themselves here and never import this module.

Modules are imported lazily inside commands where that keeps `lminf --help` and bad-input
errors fast: torch and transformers take seconds to import.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from .. import __version__
from . import bench, documents, evaluate, generate
from .options import HELP_OPTIONS, HelpGroup
from .output import one_line


def _exception_types(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class of that name, wherever this typer version keeps it."""
    found = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _exception_types("UsageError")
_CLICK_ERRORS = _exception_types("ClickException")
_ABORTS = _exception_types("Abort")
_NO_SUCH_OPTION = _exception_types("NoSuchOption")

# Commands whose last argument is free text: a question that starts with a dash reads as an option.
_TEXT_LAST = {"ask": 'lminf ask FILE -- "-QUESTION"'}


def _usage_error_line(exc: Any) -> str:
    """The one stderr line of a usage error, with a hint when a question was taken for an option."""
    line = f"lminf: error: {one_line(exc.format_message())}"
    ctx = getattr(exc, "ctx", None)
    command = getattr(getattr(ctx, "command", None), "name", None)
    if isinstance(exc, _NO_SUCH_OPTION) and command in _TEXT_LAST:
        line += f" (a question that starts with a dash goes after --: {_TEXT_LAST[command]})"
    return line


class LminfGroup(HelpGroup):
    """Formats every failure as a single `lminf: error: ...` line on stderr."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name or "lminf", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except _USAGE_ERRORS as exc:
            typer.echo(_usage_error_line(exc), err=True)
            code = 2
        except _ABORTS:
            code = 130
        except _CLICK_ERRORS as exc:
            typer.echo(f"lminf: error: {one_line(exc.format_message())}", err=True)
            code = exc.exit_code
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=LminfGroup, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  pretty_exceptions_enable=False, context_settings={"help_option_names": HELP_OPTIONS},
                  help="Read documents far longer than a model's trained length (LM-Infinite).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lminf {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False) -> None:
    """Read documents far longer than a model's trained length (LM-Infinite)."""


for _module in (generate, documents, evaluate, bench):
    _module.register(app)


def _on_sigint(signum: int, frame: Any) -> None:
    """First Ctrl-C: KeyboardInterrupt (clean exit 130 through click); a second one, in
    case a library swallowed the first: leave at once, still with 130 and no traceback."""
    global _SIGINTS
    _SIGINTS += 1
    if _SIGINTS > 1:
        os._exit(130)
    raise KeyboardInterrupt


_SIGINTS = 0


def _on_sigterm(signum: int, frame: Any) -> None:
    """`kill` (SIGTERM) ends lminf like Ctrl-C does: as an exception, so that `finally` blocks
    remove what they must (a half-written state's temporary file); the default action would
    end the process on the spot and leave it behind.  A second one leaves at once."""
    global _SIGTERMS
    _SIGTERMS += 1
    if _SIGTERMS > 1:
        os._exit(143)
    raise SystemExit(143)


_SIGTERMS = 0
# Commands whose results go to files and stderr only: they may run with stdout closed.
_NO_STDOUT = ("encode",)


def _standard_fds(argv: Sequence[str]) -> str | None:
    """Give closed standard descriptors /dev/null; return an error line when stdout is closed but needed.

    A process started with `>&-` or `<&-` has no fd 0/1/2 and Python sets sys.stdout (etc.)
    to None: lminf would do all the work and crash at the first print.  Worse, the next file
    opened would get the free number, so anything later written to "stdout" would land in it
    (a state being saved, say).  /dev/null takes the number first.
    """
    closed = []
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, mode)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        closed.append(fd)
        stream = open(fd, "r" if fd == 0 else "w", closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
        setattr(sys, ("stdin", "stdout", "stderr")[fd], stream)
    command = next((a for a in argv if not a.startswith("-")), None)
    if 1 in closed and command not in _NO_STDOUT:
        return ("standard output is closed, and lminf writes its results there; redirect it "
                "(> file, or > /dev/null to discard it) instead of closing it")
    return None


def run() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    problem = _standard_fds(sys.argv[1:])
    if problem is not None:  # before any work: nothing read, loaded or encoded in vain
        typer.echo(f"lminf: error: {problem}", err=True)
        sys.exit(2)
    try:
        app()
    except KeyboardInterrupt:  # outside click's own handling (e.g. while a module loads)
        sys.exit(130)
