"""Document commands: info, encode, ask, summarize, chat.

Thin: read options, call documents / tasks / state_io, print.  Answers go to stdout;
progress, prompts and diagnostics to stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import InputError, LminfError, UsageError
from ..passages import DEFAULT_REREAD, REREAD_BY
from .options import (
    ATTENTION_NEEDS_KV,
    EngineOptions,
    LminfCommand,
    QuietOpt,
    SamplingOptions,
    SystemOpt,
    VerboseOpt,
    check_positive,
    with_options,
)
from .output import (
    EncodeNotice,
    cli_errors,
    emit_json,
    error_line,
    finish_note,
    note,
    print_stats,
    printable,
    stats_fields,
    status,
    stream_text,
    task_progress,
    until_first,
    write_stdout,
)

FilesArg = Annotated[list[str], typer.Argument(
    metavar="FILE...", help="Text or PDF files (several are concatenated), - for stdin, or one saved state (.lminf).")]
MaxNewOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", "-n", help="Longest answer, in tokens [default: 200; summaries: by --length].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")]
SectionOpt = Annotated[Optional[int], typer.Option(
    "--section-tokens", help="Tokens per section note [default: min(2048, n_local / 2)].")]
NoteTokensOpt = Annotated[int, typer.Option("--note-tokens", help="Longest section note, in tokens.")]
RereadOpt = Annotated[Optional[int], typer.Option(
    "--reread", show_default=False, help="For a document longer than the window: the passage of this many tokens "
    "that the question is about is written out again right before it, so the model reads it from close by; "
    f"0 = off [default: {DEFAULT_REREAD}; 0 with --no-retrieval].")]
RereadByOpt = Annotated[str, typer.Option(
    "--reread-by", metavar="words|attention", help="How that passage is found: words (the question's rarer words, "
    "BM25) or attention (where the model's retrieval looks; needs retrieval).")]


def _state_source(sources: list[str]) -> str | None:
    """The .lminf path when one is given (it must then be the only source)."""
    from ..documents import is_state_path

    states = [s for s in sources if is_state_path(s)]
    if not states:
        return None
    if len(sources) > 1:
        raise UsageError("a saved state (.lminf) must be given on its own, not with other files")
    return states[0]


def read_source(sources: list[str], quiet: bool) -> Any:
    """The documents, read now (bad input fails before torch is even imported), or a state's path."""
    from ..documents import read_documents

    state_path = _state_source(sources)
    if state_path is not None:
        return state_path
    with task_progress(quiet, "Reading PDF", unit="pages") as bar:
        return read_documents(sources, progress=bar)


def load_model(opts: EngineOptions) -> tuple[Any, float]:
    """The model and the seconds loading it took."""
    t0 = time.perf_counter()
    lm = opts.load()
    return lm, time.perf_counter() - t0


def open_document(source: Any, lm: Any, opts: EngineOptions, requested: dict[str, Any], system: str | None = None,
                  **encode_options: Any):
    """(engine, encoded document) from read_source's result, with progress on stderr: documents are
    encoded (notes counted on the bar; one line first when the encode will be long), a state is loaded."""
    from ..speed import record_speed, recorded_speed, speed_key
    from ..tasks import open_source

    if isinstance(source, str):
        with status("Loading state", opts.quiet):
            return open_source(source, lm, requested, system=system)
    key = speed_key(lm)
    with task_progress(opts.quiet, "Encoding") as bar:
        def on_note(k: int, n: int, _note: str) -> None:
            if bar is not None:
                bar.describe(f"Encoding (notes {k}/{n})")

        notice = EncodeNotice(bar, opts.quiet, lm.adapter.trained_length, recorded_speed(key))
        engine, encoded = open_source(source, lm, requested, system=system, progress=notice,
                                      on_note=on_note, **encode_options)
    metrics = encoded.state.metrics
    record_speed(key, metrics.prompt_tokens, metrics.encode_seconds)
    return engine, encoded


class Reply:
    """A reply as the CLI shows it: streamed (or kept for --json), then why it ended and, with
    --verbose, its stats.  `started`: when its work began (the document's encode, when that is
    part of it), so the time to first token counts what the user waited."""

    def __init__(self, response: Any, metrics: Any, started: float, load_seconds: float | None = None,
                 per_answer: bool = False) -> None:
        self.response, self.metrics, self.started, self.load_seconds = response, metrics, started, load_seconds
        self.before = metrics.copy() if per_answer else None  # chat: this answer's share only

    def stats(self) -> dict[str, Any]:
        r = self.response
        first = None if r.first_token_at is None else r.first_token_at - self.started
        metrics = self.metrics if self.before is None else self.metrics.since(self.before)
        return stats_fields(metrics, first, self.load_seconds)

    def deliver(self, json_out: bool, quiet: bool, verbose: bool, default_budget: int | None,
                fields: Callable[[], dict[str, Any]] | None = None) -> None:
        """Stream the reply to stdout, or (--json) run it to the end and print `fields()` with the stats.

        `default_budget`: the token budget when -n was not given (a reply it cuts is noted)."""
        pieces = until_first(iter(self.response), "Answering", quiet)
        try:
            if json_out:
                for _ in pieces:
                    pass
                emit_json({**(fields() if fields else {}), "finish_reason": self.response.finish_reason,
                           "stats": self.stats()})
            else:
                stream_text(pieces)
        finally:
            pieces.close()  # a stream left early (closed pipe, Ctrl-C) still restores the document's state
        finish_note(self.response.finish_reason, default_budget, quiet)
        if verbose:
            print_stats(self.stats())


def _check_reread(reread: int | None, reread_by: str, opts: EngineOptions, files: list[str]) -> None:
    if reread is not None and reread < 0:
        raise UsageError(f"--reread must be 0 (off) or a number of tokens, got {reread}")
    if reread_by not in REREAD_BY:
        raise UsageError(f"--reread-by must be {' or '.join(REREAD_BY)}, got '{reread_by}'")
    kv = opts.retrieval or opts.middle_top_k or _state_source(files)  # a state says for itself (checked on load)
    if reread_by == "attention" and reread != 0 and not kv:
        raise UsageError(ATTENTION_NEEDS_KV)


def _hint_retrieval(encoded: Any, reread: int, reread_by: str, quiet: bool) -> None:
    """Say when a question may miss facts: the document outgrew the window and nothing retrieves.
    Refuse a re-read by attention where nothing attends to the middle."""
    s = encoded.state.cache.settings
    if reread and reread_by == "attention" and not s.retrieves:
        raise UsageError(ATTENTION_NEEDS_KV)
    if not s.retrieves and not (reread and encoded.ids is not None) and encoded.outgrows_window:
        note(f"{encoded.header.document_name} ({encoded.document_tokens:,} tokens) is longer than the "
             f"{s.n_local:,}-token window and nothing retrieves from its middle: facts there may be missed", quiet)


# -- commands -----------------------------------------------------------------

def info(
    files: FilesArg,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pages, characters and an estimated token count of documents (no model is loaded)."""
    from ..documents import estimate_tokens, is_state_path, read_document

    with cli_errors():
        rows = []
        for source in files:
            if is_state_path(source):
                from ..state_io import read_header

                header = read_header(source)
                rows.append({"file": source, "kind": "lminf state", **header.to_dict()})
                continue
            with task_progress(quiet, f"Reading {source}", unit="pages") as bar:
                doc = read_document(source, progress=bar)
            rows.append({"file": doc.name, "kind": "pdf" if doc.pages is not None else "text",
                         "pages": doc.pages, "encoding": doc.encoding, "characters": len(doc.text),
                         "words": len(doc.text.split()), "tokens_estimate": estimate_tokens(doc.text)})
        if json_out:
            for row in rows:
                emit_json(row)
            return
        out = []
        for row in rows:
            if row["kind"] == "lminf state":
                out.append(_state_lines(row))
            else:
                keys = ["file", "kind", "pages", "encoding", "characters", "words", "tokens_estimate"]
                out.append("\n".join(f"{_label(k)}: {_fmt(row[k])}" for k in keys if row.get(k) is not None))
        # Every field comes from the files (names, header strings, notes): escaped even in
        # pipes, since this is a description of the file, not its content.
        write_stdout(printable("\n\n".join(out)) + "\n")


def _label(key: str) -> str:
    return {"tokens_estimate": "tokens (estimate, cl100k)"}.get(key, key)


def _fmt(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _state_lines(row: dict[str, Any]) -> str:
    size, s = Path(row["file"]).expanduser().stat().st_size, row["settings"]
    lines = [
        ("file", row["file"]), ("kind", "lminf state"), ("size", f"{size / 2**20:,.1f} MiB"),
        ("model", f"{row['model_name']} (fingerprint {row['model_fingerprint']})"),
        ("attention", f"n_global={s['n_global']} n_local={s['n_local']} limit_distance={s['limit_distance']} "
                      f"chunk={s['chunk_size']} dtype={row['dtype']}"
                      + (f" kv={s['kv_quantize']}" if s.get("kv_quantize", "none") != "none" else "")),
        ("retrieval", f"top-k {s['middle_top_k']} from layer {s['middle_from_layer']}, "
                      f"distance {s['middle_distance']}" if s["middle_top_k"] else "off"),
        ("document", row["document_name"]), ("pages", row["document_pages"]),
        ("characters", row["document_characters"]), ("tokens", row["document_tokens"]),
        ("sha256", row["document_sha256"]), ("section notes", len(row["notes"]) or "none"),
    ]
    return "\n".join(f"{k}: {_fmt(v)}" for k, v in lines if v is not None)


@with_options(EngineOptions, "opts")
def encode(
    files: FilesArg,
    output: Annotated[str, typer.Option("--output", "-o", metavar="PATH",
                                        help="State file to write (.lminf).")],
    notes: Annotated[bool, typer.Option("--notes", help="Also write section notes on the way (for summarize).")]
    = False,
    section_tokens: SectionOpt = None,
    note_tokens: NoteTokensOpt = 96,
    system: SystemOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --output if it exists (never an input).")]
    = False,
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Encode documents once and save the constant-size state for ask, summarize and chat."""
    from ..documents import STATE_SUFFIX, is_state_path
    from ..outputs import check_destination

    with cli_errors():
        if not output.lower().endswith(STATE_SUFFIX):
            raise UsageError(f"--output must end in {STATE_SUFFIX}, got '{output}'")
        if any(is_state_path(f) for f in files):
            raise UsageError("encode reads text or PDF files, not a saved state")
        check_positive("--note-tokens", note_tokens)
        requested = opts.requested()
        # Before the documents are read and the model loaded: an encode that cannot be saved is
        # minutes of work thrown away.
        check_destination(output, overwrite=force, inputs=files)
        source = read_source(files, opts.quiet)
        from ..state_io import save_state

        lm, _ = load_model(opts)
        _, encoded = open_document(source, lm, opts, requested, system, notes=notes, section_tokens=section_tokens,
                                   note_tokens=note_tokens)
        with status("Saving state", opts.quiet):
            size = save_state(output, encoded.state, encoded.header, encoded.ids, overwrite=force)
        note(f"wrote {output}: {encoded.document_tokens:,} document tokens, {size / 2**20:,.1f} MiB", opts.quiet)


@with_options(EngineOptions, "opts")
@with_options(SamplingOptions, "sampling")
def ask(
    args: Annotated[list[str], typer.Argument(
        metavar="FILE... QUESTION",
        help="Text or PDF files (several are concatenated), - for stdin, or one saved state (.lminf); "
             "then the question, in quotes (after -- if it starts with a dash).")],
    json_out: JsonOpt = False,
    max_new_tokens: MaxNewOpt = None,
    reread: RereadOpt = None,
    reread_by: RereadByOpt = "words",
    system: SystemOpt = None,
    verbose: VerboseOpt = False,
    sampling: SamplingOptions = SamplingOptions(),
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Answer a question about documents (or a saved state), streaming the answer to stdout."""
    from ..prompts import check_question

    t0 = time.perf_counter()
    with cli_errors():
        if len(args) < 2:
            raise UsageError('give a document and a question: lminf ask FILE "QUESTION"')
        files, question = args[:-1], check_question(args[-1])
        check_positive("--max-new-tokens", max_new_tokens)
        _check_reread(reread, reread_by, opts, files)
        requested = opts.requested()
        sampling.given()
        source = read_source(files, opts.quiet)
        from ..tasks import DEFAULT_ANSWER_TOKENS, reread_for
        from ..tasks import ask as ask_task

        lm, load_seconds = load_model(opts)
        params = sampling.params(lm, "answer")
        started = time.perf_counter()
        engine, encoded = open_document(source, lm, opts, requested, system)
        reread = reread_for(opts.retrieval, reread)
        _hint_retrieval(encoded, reread, reread_by, opts.quiet)
        budget = max_new_tokens or DEFAULT_ANSWER_TOKENS
        response = ask_task(engine, encoded, question, budget, params, reread, reread_by)
        Reply(response, encoded.state.metrics, started, load_seconds).deliver(
            json_out, opts.quiet, verbose, None if max_new_tokens else budget, lambda: {
                "answer": response.text(), "document_tokens": encoded.document_tokens,
                "prompt_tokens": response.prompt_tokens, "answer_tokens": len(response.token_ids),
                "seconds": round(time.perf_counter() - t0, 3)})


@with_options(EngineOptions, "opts")
@with_options(SamplingOptions, "sampling")
def summarize(
    files: FilesArg,
    length: Annotated[str, typer.Option("--length", "-l", metavar="short|medium|long",
                                        help="How long a summary.")] = "medium",
    json_out: JsonOpt = False,
    section_tokens: SectionOpt = None,
    note_tokens: NoteTokensOpt = 96,
    show_notes: Annotated[bool, typer.Option(
        "--show-notes", help="Print each section note on stderr as it is written (watch the reading).")] = False,
    max_new_tokens: MaxNewOpt = None,
    system: SystemOpt = None,
    verbose: VerboseOpt = False,
    sampling: SamplingOptions = SamplingOptions(),
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Summarize whole documents: section notes while reading, then a summary from them."""
    from ..prompts import summary_length

    t0 = time.perf_counter()
    with cli_errors():
        check_positive("--max-new-tokens", max_new_tokens)
        check_positive("--note-tokens", note_tokens)
        budget = max_new_tokens or summary_length(length)[1]
        requested = opts.requested()
        sampling.given()
        source = read_source(files, opts.quiet)
        from ..speed import record_speed, recorded_speed, speed_key
        from ..tasks import summarize_source

        lm, load_seconds = load_model(opts)
        params = sampling.params(lm, "answer")
        started = time.perf_counter()
        key = speed_key(lm)
        with task_progress(opts.quiet, "Encoding") as bar:
            def on_note(k: int, n: int, text: str) -> None:
                if bar is not None:
                    bar.describe(f"Encoding (notes {k}/{n})")
                if show_notes:
                    note(f"note {k}/{n}: {text}")

            notice = EncodeNotice(bar, opts.quiet, lm.adapter.trained_length, recorded_speed(key))
            # Sections with notes only when the document, a summary prompt and the summary overflow one window.
            _, encoded, summary = summarize_source(source, lm, requested, length, max_new_tokens, params,
                                                   section_tokens, note_tokens, progress=notice, on_note=on_note,
                                                   system=system)
        record_speed(key, encoded.state.metrics.prompt_tokens, encoded.state.metrics.encode_seconds)
        if not summary.covers_whole_document:
            note(f"{encoded.header.document_name} is longer than one window and its state has no section notes: "
                 "the summary covers mainly its end (encode it with --notes for a whole-document summary)")
        with status("Writing the summary", opts.quiet):
            summary.text()  # written in full and checked before it is shown
        if summary.fallback:
            which = ", ".join(map(str, summary.fallback_parts))
            note(f"the model's summary said nothing about part {which} of the document: the section notes "
                 "stand in for it", opts.quiet)
        Reply(summary, encoded.state.metrics, started, load_seconds).deliver(
            json_out, opts.quiet, verbose, None if max_new_tokens else budget, lambda: {
                "summary": summary.text(), "notes": encoded.notes, "fallback_parts": summary.fallback_parts,
                "document_tokens": encoded.document_tokens, "summary_tokens": len(summary.token_ids),
                "timings": summary.timings, "seconds": round(time.perf_counter() - t0, 3)})


CHAT_HELP = ("Ask questions about the document. Commands: /reset (forget the conversation), "
             "/save PATH (.lminf: the encoded document; other names: the transcript; /save! PATH replaces "
             "an existing file), /quit. "
             "Ctrl-C stops an answer; Ctrl-D (or Ctrl-C at an empty prompt) leaves.")


@with_options(EngineOptions, "opts")
@with_options(SamplingOptions, "sampling")
def chat(
    files: FilesArg,
    history: Annotated[int, typer.Option(help="Previous exchanges replayed before each question "
                                              "(0: every answer depends on the document alone).")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per answer (JSON lines).")] = False,
    max_new_tokens: MaxNewOpt = None,
    reread: RereadOpt = None,
    reread_by: RereadByOpt = "words",
    system: SystemOpt = None,
    verbose: VerboseOpt = False,
    sampling: SamplingOptions = SamplingOptions(),
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Interactive questions about documents, encoded once; reads one question per line when piped.

    At a terminal: line editing, and a history kept across sessions (in $XDG_DATA_HOME/lminf,
    else ~/.local/share/lminf); Ctrl-C stops an answer and keeps the document encoded.
    """
    with cli_errors():
        if "-" in files:
            raise UsageError("chat reads its questions from stdin, so the document cannot come from stdin too; "
                             "give a file (or use lminf ask - QUESTION)")
        if history < 0:
            raise UsageError(f"--history must be >= 0, got {history}")
        check_positive("--max-new-tokens", max_new_tokens)
        _check_reread(reread, reread_by, opts, list(files))
        requested = opts.requested()
        sampling.given()
        source = read_source(files, opts.quiet)
        from ..tasks import DEFAULT_ANSWER_TOKENS, ChatSession, reread_for

        lm, _ = load_model(opts)
        params = sampling.params(lm, "answer")
        engine, encoded = open_document(source, lm, opts, requested, system)
        reread = reread_for(opts.retrieval, reread)
        _hint_retrieval(encoded, reread, reread_by, opts.quiet)
        budget = max_new_tokens or DEFAULT_ANSWER_TOKENS
        session = ChatSession(engine, encoded, history, budget, params, reread, reread_by)
        tty = sys.stdin.isatty()
        if tty and not opts.quiet:
            typer.echo(printable(f"{encoded.header.document_name}: {encoded.document_tokens:,} tokens encoded. "
                                 f"{CHAT_HELP}", keep_layout=False), err=True)
        with ChatInterrupts() as interrupts:
            for line in _questions(tty):
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    if _command(text, session, encoded, files) == "quit":
                        break
                    continue
                with interrupts.answering() as started:
                    response = session.ask(text)
                    started(response)
                    reply = Reply(response, encoded.state.metrics, time.perf_counter(), per_answer=True)
                    reply.deliver(json_out, opts.quiet, verbose, None if max_new_tokens else budget,
                                  lambda text=text, r=response: {
                                      "question": text, "answer": r.text(), "answer_tokens": len(r.token_ids),
                                      "seconds": round(r.seconds, 3)})
                if response.finish_reason == "cancelled":
                    note("answer stopped; the document is still encoded", opts.quiet)
                if tty and not json_out:
                    write_stdout("\n")


class ChatInterrupts:
    """Ctrl-C in a chat.  While a question is being answered, it stops that answer: Response.cancel
    (a flag the reply checks after each token: it ends there, at its last complete sentence, and
    the document's state is restored as after any answer); a second one during the same answer
    interrupts as usual.  While the chat waits for a question, Ctrl-C interrupts as usual."""

    def __init__(self) -> None:
        self.answering_now = False
        self.response: Any = None
        self.pending = False  # Ctrl-C before the response existed: cancel it as soon as it does
        self.previous: Any = None

    def __enter__(self) -> ChatInterrupts:
        try:
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self.previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self.answering_now or self.pending:
            raise KeyboardInterrupt
        self.pending = True
        if self.response is not None:
            self.response.cancel()  # only sets a flag: safe wherever the signal lands

    @contextlib.contextmanager
    def answering(self) -> Iterator[Callable[[Any], None]]:
        """A question is being answered; call the yielded function with its Response once made."""
        def started(response: Any) -> None:
            self.response = response
            if self.pending:
                response.cancel()

        self.answering_now, self.pending, self.response = True, False, None
        try:
            yield started
        finally:
            self.answering_now, self.response = False, None


def history_path() -> Path:
    """Where chat keeps its question history: $XDG_DATA_HOME/lminf, else ~/.local/share/lminf."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lminf" / "chat_history"


def _questions(tty: bool) -> Iterator[str]:
    """Lines typed at a terminal (line editing, history across sessions) or read from a pipe.

    At a terminal Ctrl-D ends the chat, and so does Ctrl-C at an empty prompt (exit 130,
    as any interrupt); Ctrl-C with something typed drops that line, as shells do.
    """
    with contextlib.suppress(AttributeError, ValueError):
        # A question that is not valid UTF-8 gets U+FFFD where its bad bytes were, not a traceback.
        sys.stdin.reconfigure(errors="replace")
    if not tty:
        for line in sys.stdin:
            yield line
        return
    readline = _readline_with_history()
    while True:
        try:
            if sys.stdout.isatty():
                line = input("> ")
            else:
                # Answers are being redirected: keep the prompt on the terminal, out of the file.
                sys.stderr.write("> ")
                sys.stderr.flush()
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            if sys.stderr.isatty():
                sys.stderr.write("\n")
            return
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            if readline is not None and readline.get_line_buffer().strip():
                continue
            raise
        if readline is not None and line.strip():
            with contextlib.suppress(OSError):
                readline.write_history_file(str(history_path()))
        yield line


def _readline_with_history() -> Any:
    """The readline module with this user's chat history loaded (None where there is no readline)."""
    try:
        import readline  # importing it gives input() line editing and arrow-key history
    except ImportError:
        return None
    readline.set_history_length(1000)
    path = history_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            readline.read_history_file(str(path))
    return readline


def _command(text: str, session: Any, encoded: Any, inputs: list[str]) -> str | None:
    """Run a /command; problems are reported on stderr and the session goes on.

    /save never replaces an existing file (/save! does) and never one of `inputs`, the
    documents (or state) being discussed.
    """
    from ..documents import is_state_path
    from ..outputs import check_destination, write_text
    from ..state_io import save_state

    name, _, arg = text.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/quit", "/exit", "/q"):
            return "quit"
        if name == "/reset":
            session.reset()
            note("conversation forgotten; the next answer depends on the document alone")
        elif name in ("/save", "/save!"):
            if not arg:
                raise UsageError(f"{name} needs a path: {name} notes.txt (transcript) or {name} book.lminf (state)")
            overwrite = name == "/save!"
            check_destination(arg, overwrite=overwrite, inputs=inputs,
                              how_to_overwrite=f"use /save! {arg} to replace it")
            if is_state_path(arg):
                size = save_state(arg, encoded.state, encoded.header, encoded.ids, overwrite=overwrite)
                note(f"wrote {arg} ({size / 2**20:,.1f} MiB)")
            else:
                try:
                    write_text(arg, session.transcript_text(), overwrite)
                except OSError as exc:
                    raise InputError(f"cannot write {arg}: {exc.strerror or exc}") from exc
                note(f"wrote the transcript to {arg}")
        elif name == "/help":
            note(CHAT_HELP)
        else:
            raise UsageError(f"unknown command {name}; {CHAT_HELP}")
    except LminfError as exc:
        typer.echo(error_line(exc), err=True)
    return None


def register(app: typer.Typer) -> None:
    """Attach the document commands to the lminf app."""
    app.command("info", cls=LminfCommand)(info)
    app.command("encode", cls=LminfCommand)(encode)
    app.command("ask", cls=LminfCommand)(ask)
    app.command("summarize", cls=LminfCommand)(summarize)
    app.command("chat", cls=LminfCommand)(chat)

