"""Document workflows over the engine: encode once, then ask, summarize or chat.  Nothing here prints.

The document is encoded once into a constant-size Λ cache.  Every task then takes a
detour from that state: it checkpoints the cache, appends its prompt, generates, and
restores the checkpoint, so the encoded document is never altered and each answer
depends only on the document (and, in a chat, on the turns kept as history).

Whole-document summaries: Λ-attention sees the first n_global tokens and the last
n_local directly, so a summary asked for at the end would describe only the end.
While the document streams through the cache in sections, a detour after each
section asks for notes on it (the section is still inside the window); the final
summary is asked for with all the notes written out after the document, where they
are inside the window.  Notes that would not fit are merged in rounds first.
See docs/summaries.md.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .documents import Document
from .errors import UsageError
from .generate import Engine, IncrementalDecoder, SamplingParams, State
from .long_text import tokenize_long
from .prompts import NOTE_START, PromptFormat, check_question, summary_length
from .state_io import Checkpoint, StateHeader, build_header

Progress = Callable[[int, int], None]
# Small models sometimes loop instead of emitting their end token: three blank lines in a
# row, or a verbatim repeat of a long span, end a reply (no prose answer needs either).
_RUNAWAY_BLANKS = re.compile(r"\n[ \t]*\n[ \t]*\n[ \t]*\n[ \t]*$")
LOOP_SPAN = 60  # a reply whose last LOOP_SPAN characters already appeared in it is looping


def _looping(text: str) -> bool:
    """True when the text ends by repeating, verbatim, a span it already contains."""
    return len(text) >= 2 * LOOP_SPAN and text[-LOOP_SPAN:] in text[:-LOOP_SPAN]
NoteCallback = Callable[[int, int, str], None]  # (section index, number of sections, note)

DEFAULT_ANSWER_TOKENS = 200
NOTE_TOKENS = 96          # budget of one section note
MAX_SECTION_TOKENS = 2048  # sections are at most this long, and at most half the window
MERGE_GROUP = 4           # notes condensed into one per merge round
SUMMARY_PROMPT_RESERVE = 64  # tokens of a summary request without notes (about 40 with a chat template)


@dataclass
class EncodedDocument:
    """A document encoded into a Λ cache, ready for any number of tasks."""

    state: State
    fmt: PromptFormat
    header: StateHeader

    @property
    def document_tokens(self) -> int:
        """Tokens of the document itself (the prompt head excluded)."""
        return self.header.document_tokens

    def prompt_ids(self, engine: Engine, text: str) -> list[int]:
        """Ids of a prompt that follows the document (the held-back tail of the document first)."""
        return tokenize(engine, self.header.tail + text)

    @property
    def notes(self) -> list[str]:
        """Section notes written while encoding (empty unless asked for)."""
        return self.header.notes


@dataclass
class Reply:
    """A generated answer; filled in while its stream is consumed."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seconds: float = 0.0


def tokenize(engine: Engine, text: str) -> list[int]:
    """Text -> ids, with no special tokens added (prompts carry their own)."""
    return list(engine.lm.tokenizer.encode(text, add_special_tokens=False))


def stream_reply(engine: Engine, state: State, prompt_ids: Sequence[int], max_new_tokens: int,
                 sampling: SamplingParams | None, reply: Reply) -> Iterator[str]:
    """Append prompt_ids to the encoded state, stream the generated text, then restore the state.

    The state is restored even when the consumer stops early (closed pipe, Ctrl-C).
    """
    if not prompt_ids:
        raise ValueError("a reply needs a prompt")
    t0 = time.perf_counter()
    checkpoint = Checkpoint(state, len(prompt_ids) + max(max_new_tokens, 1))
    try:
        engine.encode(prompt_ids, state)
        decoder = IncrementalDecoder(engine.lm.tokenizer)
        reply.prompt_tokens = len(prompt_ids)
        for token in engine.generate(state, max_new_tokens, sampling):
            reply.token_ids.append(token)
            piece = decoder.push(token)
            if piece:
                reply.text += piece
                yield piece
                if _RUNAWAY_BLANKS.search(reply.text[-64:]) or _looping(reply.text):
                    break
    finally:
        checkpoint.restore()
        reply.seconds = time.perf_counter() - t0


def generate_text(engine: Engine, state: State, prompt: str, max_new_tokens: int,
                  sampling: SamplingParams | None = None) -> str:
    """A whole reply as one string (stripped); the state is left unchanged."""
    reply = Reply()
    for _ in stream_reply(engine, state, tokenize(engine, prompt), max_new_tokens, sampling, reply):
        pass
    return reply.text.strip()


# -- Encoding ---------------------------------------------------------------

def section_size(engine: Engine, requested: int | None = None) -> int:
    """Tokens per section for notes: at most half the window, so a section is read whole before its note."""
    if requested is not None:
        if requested <= 0:
            raise UsageError(f"--section-tokens must be positive, got {requested}")
        return requested
    return max(16, min(MAX_SECTION_TOKENS, engine.settings.n_local // 2))


def section_bounds(engine: Engine, ids: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Cut ids into sections of about `size` tokens, preferring to end a section at a line break."""
    tokenizer = engine.lm.tokenizer
    newline: dict[int, bool] = {}

    def ends_line(i: int) -> bool:
        tid = ids[i]
        if tid not in newline:
            newline[tid] = "\n" in tokenizer.decode([tid])
        return newline[tid]

    bounds, start, n = [], 0, len(ids)
    while n - start > size + size // 4:  # a short remainder joins the last section
        cut = start + size
        for j in range(cut - 1, cut - 1 - size // 4, -1):
            if ends_line(j):
                cut = j + 1
                break
        bounds.append((start, cut))
        start = cut
    bounds.append((start, n))
    return bounds


def encode_document(engine: Engine, doc: Document, model_spec: str, *, question_first: str | None = None,
                    notes: bool | None = False, reserve: int = 0, section_tokens: int | None = None,
                    note_tokens: int = NOTE_TOKENS,
                    sampling: SamplingParams | None = None, progress: Progress | None = None,
                    on_note: NoteCallback | None = None) -> EncodedDocument:
    """Encode  head + document  once; with `notes`, write a note after each section on the way.

    notes: True always, False never, None when the document does not fit in one window
    with `reserve` tokens to spare (room for a summary prompt and the summary).  The
    notes are detours (checkpoint, prompt, generate, restore), so the encoded state is
    the same with or without them.

    Head and document are tokenized as one text, and the document's last few tokens are
    held back (`header.tail`) and tokenized again with each prompt: the tokens at both
    seams are then those of the whole conversation written out, whatever the tokenizer
    glues together (e.g. "end." + "\n\n" is one token for some and two for others).
    """
    fmt = PromptFormat.for_tokenizer(engine.lm.tokenizer)
    head_text = fmt.document_head(question_first)
    n_head = len(tokenize(engine, head_text))
    ids = tokenize_long(engine.lm.tokenizer, head_text + doc.text.strip())  # pieces: same ids, bounded memory
    if len(ids) <= n_head:
        raise UsageError(f"{doc.name} has no tokens to encode")
    held = _hold_back(engine, ids, n_head)
    tail = engine.lm.tokenizer.decode(ids[len(ids) - held:]) if held else ""
    stream = ids[:len(ids) - held]
    if notes is None:
        notes = len(ids) + reserve > engine.settings.n_local
    written: list[str] = []
    if progress is not None:
        progress(0, len(stream))  # the total is known before the first chunk (ui.EncodeNotice uses it)
    state = engine.encode(stream[:n_head])
    # Sections are the same with or without notes, so both give bit-identical states.
    bounds = [(a + n_head, b + n_head)
              for a, b in section_bounds(engine, stream[n_head:], section_size(engine, section_tokens))]
    for k, (a, b) in enumerate(bounds):
        def report(done: int, _n: int, a: int = a) -> None:
            if progress is not None:
                progress(a + done, len(stream))

        if b > a:
            engine.encode(stream[a:b], state, progress=report)
        if notes:
            last = k == len(bounds) - 1
            prompt = (tail if last else "") + fmt.section_note()
            note = f"{NOTE_START} {generate_text(engine, state, prompt, note_tokens, sampling)}"
            written.append(note)
            if on_note is not None:
                on_note(k + 1, len(bounds), note)
    header = build_header(engine, state, model_spec, fmt.fingerprint, doc.name, doc.sha256, len(ids) - n_head,
                          len(doc.text), doc.pages, written, tail)
    return EncodedDocument(state, fmt, header)


def _hold_back(engine: Engine, ids: Sequence[int], start: int) -> int:
    """How many trailing ids to re-tokenize with each prompt: 4 or more, ending on a clean text boundary."""
    tokenizer = engine.lm.tokenizer
    for k in range(4, 17):
        if len(ids) - k <= start:
            break
        if tokenize(engine, tokenizer.decode(ids[len(ids) - k:])) == list(ids[len(ids) - k:]):
            return k
    return 0


# -- Tasks ------------------------------------------------------------------

def ask(engine: Engine, encoded: EncodedDocument, question: str, max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
        sampling: SamplingParams | None = None, reply: Reply | None = None) -> Iterator[str]:
    """Stream the answer to one question about the encoded document."""
    prompt = encoded.prompt_ids(engine, encoded.fmt.question(check_question(question)))
    return stream_reply(engine, encoded.state, prompt, max_new_tokens, sampling, reply or Reply())


@dataclass
class SummaryPlan:
    """How a summary will be made: from section notes, or directly from what the cache holds."""

    notes: list[str]
    covers_whole_document: bool


def plan_summary(engine: Engine, encoded: EncodedDocument, length: str, budget: int | None = None) -> SummaryPlan:
    """Notes when there are any; otherwise direct, which covers everything only if it fits the window."""
    budget = budget if budget is not None else summary_length(length)[1]
    if encoded.notes:
        return SummaryPlan(encoded.notes, True)
    stream = encoded.header.length + len(encoded.prompt_ids(engine, encoded.fmt.summary(length))) + budget
    return SummaryPlan([], stream <= engine.settings.n_local)


def condense_notes(engine: Engine, encoded: EncodedDocument, notes: list[str], budget_tokens: int,
                   sampling: SamplingParams | None = None, note_tokens: int = 2 * NOTE_TOKENS,
                   on_round: Callable[[int, int], None] | None = None) -> list[str]:
    """Merge consecutive notes, MERGE_GROUP at a time, until their prompt fits `budget_tokens`."""
    fmt = encoded.fmt
    while len(notes) > 1 and len(encoded.prompt_ids(engine, fmt.summary("short", notes))) > budget_tokens:
        groups = [notes[i:i + MERGE_GROUP] for i in range(0, len(notes), MERGE_GROUP)]
        if on_round is not None:
            on_round(len(notes), len(groups))
        notes = [g[0] if len(g) == 1 else generate_text(engine, encoded.state, encoded.header.tail + fmt.merge_notes(g),
                                                        note_tokens, sampling) for g in groups]
    return notes


def summarize(engine: Engine, encoded: EncodedDocument, length: str = "medium", max_new_tokens: int | None = None,
              sampling: SamplingParams | None = None, reply: Reply | None = None,
              notes: list[str] | None = None) -> Iterator[str]:
    """Stream a summary: from `notes` (already condensed) when given, else from the encoded state."""
    budget = max_new_tokens if max_new_tokens is not None else summary_length(length)[1]
    prompt = encoded.prompt_ids(engine, encoded.fmt.summary(length, notes or ()))
    return stream_reply(engine, encoded.state, prompt, budget, sampling, reply or Reply())


def notes_budget(engine: Engine) -> int:
    """Tokens the notes prompt may take: half the window, the rest stays for the document's end."""
    return engine.settings.n_local // 2


@dataclass
class Turn:
    """One chat exchange, kept as tokens so history is replayed exactly."""

    question: str
    answer: str
    answer_ids: list[int]


class ChatSession:
    """Questions about one encoded document.

    Each answer starts from the encoded document, with the last `history` exchanges
    replayed after it (so follow-up questions work); history 0 makes every answer
    identical to `ask`.  The document itself is never re-encoded, and the history
    never pushes the document out of the window for good: it is rebuilt per question.
    """

    def __init__(self, engine: Engine, encoded: EncodedDocument, history: int = 3,
                 max_new_tokens: int = DEFAULT_ANSWER_TOKENS, sampling: SamplingParams | None = None) -> None:
        if history < 0:
            raise UsageError(f"--history must be >= 0, got {history}")
        self.engine, self.encoded = engine, encoded
        self.history, self.max_new_tokens, self.sampling = history, max_new_tokens, sampling
        self.turns: list[Turn] = []
        self.transcript: list[Turn] = []  # everything said, /reset or not

    def prompt_ids(self, question: str) -> list[int]:
        """History turns (question + answer tokens) followed by the new question."""
        fmt, kept = self.encoded.fmt, self.turns[-self.history:] if self.history else []
        ids: list[int] = []
        for i, turn in enumerate(kept):
            if i == 0:
                ids += self.encoded.prompt_ids(self.engine, fmt.question(turn.question))
            else:
                ids += tokenize(self.engine, fmt.follow_up(turn.question))
            ids += turn.answer_ids
        if kept:
            return ids + tokenize(self.engine, fmt.follow_up(question))
        return self.encoded.prompt_ids(self.engine, fmt.question(question))

    def ask(self, question: str, reply: Reply | None = None) -> Iterator[str]:
        """Stream the answer; the exchange joins the history once the answer is complete."""
        question = check_question(question)
        reply = reply or Reply()
        yield from stream_reply(self.engine, self.encoded.state, self.prompt_ids(question), self.max_new_tokens,
                                self.sampling, reply)
        turn = Turn(question, reply.text.strip(), list(reply.token_ids))
        self.turns.append(turn)
        self.transcript.append(turn)

    def reset(self) -> None:
        """Forget the conversation; the next answer depends on the document alone."""
        self.turns.clear()

    def transcript_text(self) -> str:
        """The conversation so far as plain text (Q:/A: pairs)."""
        return "".join(f"Q: {t.question}\nA: {t.answer}\n\n" for t in self.transcript)


def chunk_size_for(header: StateHeader | None, requested: int | None) -> int | None:
    """A saved state fixes the chunk size (its ring was sized for it); otherwise the option or default."""
    if header is None:
        return requested
    if requested is not None and requested != header.max_chunk:
        raise UsageError(f"this state was encoded with --chunk-size {header.max_chunk}; "
                         f"--chunk-size {requested} cannot be used with it")
    return header.max_chunk or None
