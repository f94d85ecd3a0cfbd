"""Document workflows over the engine: encode once, then ask, summarize or chat.  Nothing here prints.

    engine, encoded = open_source(source, lm, requested)   # encode a Document, or load a .lminf state
    response = ask(engine, encoded, "Who kept the light?")
    for piece in response: ...                              # or response.text()

The document is encoded once into a constant-size Λ cache.  Every task then takes a
detour from that state: it snapshots the state, appends its prompt, generates, and
restores the snapshot, so the encoded document is never altered and each answer
depends only on the document (and, in a chat, on the turns kept as history).

Whole-document summaries: Λ-attention sees the first n_global tokens and the last
n_local directly, so a summary asked for at the end would describe only the end.
While the document streams through the cache in sections, a detour after each
section asks for notes on it (the section is still inside the window); the final
summary is asked for with all the notes written out after the document, where they
are inside the window.  Notes that would not fit are merged in rounds first.
See docs/documents.md.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .documents import Document
from .errors import SettingsError, UsageError
from .generate import Engine, GenerationResponse, State
from .long_text import tokenize_long
from .models import LoadedModel
from .passages import DEFAULT_REREAD, REREAD_BY, STOPWORDS, bm25_scores, terms
from .progress import Progress
from .prompts import NOTE_START, PromptFormat, check_question, summary_length
from .sampling import SamplingParams
from .settings import RETRIEVAL_TOP_K, LambdaSettings
from .state_io import StateHeader, build_header, load_state, read_header, read_stream_ids

# Small models sometimes loop instead of emitting their end token: three blank lines in a
# row, or a verbatim repeat of a long span, end a reply (no prose answer needs either).
_RUNAWAY_BLANKS = re.compile(r"\n[ \t]*\n[ \t]*\n[ \t]*\n[ \t]*$")
LOOP_SPAN = 60  # a reply whose last LOOP_SPAN characters already appeared in it is looping
# Where a sentence (or a paragraph) ends: a reply is released up to there, so that a reply the
# loop guard stops, or the user cancels, ends at its last complete sentence.  Whitespace must
# follow the punctuation ("3.14" does not end one), and closing quotes or brackets go with it.
# A single line break is no boundary: the model copies a document's hard-wrapped lines, which
# break mid-sentence (measured on the GPL and Python's docs).
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(?=\s)|\n[ \t]*\n")

NoteCallback = Callable[[int, int, str], None]  # (section index, number of sections, note)

DEFAULT_ANSWER_TOKENS = 200
NOTE_TOKENS = 96          # budget of one section note
MAX_SECTION_TOKENS = 2048  # sections are at most this long, and at most half the window
MERGE_GROUP = 4           # notes condensed into one per merge round
SUMMARY_PROMPT_RESERVE = 64  # tokens of a summary request without notes (about 40 with a chat template)


def _looping(text: str) -> bool:
    """True when the text ends by repeating, verbatim, a span it already contains."""
    return len(text) >= 2 * LOOP_SPAN and text[-LOOP_SPAN:] in text[:-LOOP_SPAN]


@dataclass
class EncodedDocument:
    """A document encoded into a Λ cache, ready for any number of tasks."""

    state: State
    fmt: PromptFormat
    header: StateHeader
    ids: Tensor | None = None  # the encoded stream's token ids [length] (int32): passages can be re-read
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent encoding, and writing notes

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

    @property
    def outgrows_window(self) -> bool:
        """Whether the document is longer than what the model sees directly (first tokens + window)."""
        s = self.state.cache.settings
        return self.document_tokens > s.n_global + s.n_local


class ReplyControl:
    """Shared between a Response and its stream: a request to stop (checked once per token)."""

    def __init__(self) -> None:
        self.cancelled = False


class Response:
    """A reply being generated: iterate it for text pieces as they come, or call text().

    Iterating runs the generation; the state it started from is restored when the
    stream ends, including when the consumer stops early (closed pipe, Ctrl-C):
    the iteration's `finally` closes the underlying stream.  `cancel()` (safe to call from
    a signal handler) ends the reply after the token being generated, at its last complete
    sentence, with finish_reason "cancelled".
    """

    def __init__(self, stream: Iterator[GenerationResponse], prompt_tokens: int,
                 control: ReplyControl | None = None) -> None:
        self._stream = stream
        self._control = control or ReplyControl()
        self._chunks: list[str] = []
        self._done = False
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.generation_tps = 0.0
        self.peak_memory_bytes = 0
        self.seconds = 0.0
        self.first_token_at: float | None = None  # time.perf_counter() when the first token was sampled
        self.on_complete: Callable[[Response], None] | None = None

    def cancel(self) -> None:
        """Stop after the current token; the state is restored as after any reply."""
        self._control.cancelled = True

    def __iter__(self) -> Iterator[str]:
        if self._done:
            yield from self._chunks
            return
        t0 = time.perf_counter()
        try:
            for r in self._stream:
                if r.token is not None:
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                    self.token_ids.append(r.token)
                if r.finish_reason is not None:
                    self.finish_reason = r.finish_reason
                    self.generation_tps, self.peak_memory_bytes = r.generation_tps, r.peak_memory_bytes
                if r.text:
                    self._chunks.append(r.text)
                    yield r.text
            complete = True
        except GeneratorExit:
            complete = False
            raise
        finally:
            self._stream.close()
            self._done = True
            self.seconds = time.perf_counter() - t0
        if complete and self.on_complete is not None:
            self.on_complete(self)

    def text(self) -> str:
        """The whole reply, stripped (generating it first if needed)."""
        for _ in self:
            pass
        return "".join(self._chunks).strip()


def tokenize(engine: Engine, text: str) -> list[int]:
    """Text -> ids, with no special tokens added (prompts carry their own)."""
    return list(engine.lm.tokenizer.encode(text, add_special_tokens=False))


def _last_sentence_end(text: str, start: int) -> int:
    """End of the last complete sentence (or paragraph) in text[start:], as an index of text; start if none."""
    end = start
    for m in _SENTENCE_END.finditer(text, start):
        end = m.end()
    return end


def _reply_stream(engine: Engine, state: State, prompt_ids: Sequence[int], max_new_tokens: int,
                  sampling: SamplingParams | None,
                  control: ReplyControl | None = None) -> Iterator[GenerationResponse]:
    """Append prompt_ids to the encoded state, stream the reply, then restore the state (in `finally`).

    Text is released a sentence (or paragraph) at a time: when the loop guard stops a runaway
    reply ("loop") or the reply is cancelled ("cancelled"), it then ends at its last
    complete sentence, never mid-word.  A reply that ends by itself ("stop") or at
    max_new_tokens ("length") is released whole.
    """
    control = control or ReplyControl()
    snap = state.snapshot(len(prompt_ids) + max(max_new_tokens, 1))
    try:
        engine.encode(prompt_ids, state)
        text, released = "", 0
        with contextlib.closing(engine.stream_generate(state, max_new_tokens, sampling)) as stream:
            for r in stream:
                text += r.text
                if r.finish_reason is not None:  # the reply ended by itself: release it all
                    yield dataclasses.replace(r, text=text[released:])
                    return
                end = _last_sentence_end(text, released)
                yield dataclasses.replace(r, text=text[released:end])
                released = end
                reason = None
                if control.cancelled:
                    reason = "cancelled"
                elif r.text and (_RUNAWAY_BLANKS.search(text[-64:]) or _looping(text)):
                    reason = "loop"
                if reason is not None:
                    yield GenerationResponse("", None, r.generated, r.generation_tps, r.peak_memory_bytes, reason)
                    return
    finally:
        state.restore(snap)


def reply(engine: Engine, state: State, prompt_ids: Sequence[int], max_new_tokens: int,
          sampling: SamplingParams | None = None) -> Response:
    """The reply to prompt_ids appended to the encoded state; the state is left as it was."""
    if not prompt_ids:
        raise ValueError("a reply needs a prompt")
    control = ReplyControl()
    return Response(_reply_stream(engine, state, prompt_ids, max_new_tokens, sampling, control), len(prompt_ids),
                    control)


def generate_text(engine: Engine, state: State, prompt: str, max_new_tokens: int,
                  sampling: SamplingParams | None = None) -> str:
    """A whole reply as one string (stripped); the state is left unchanged."""
    return reply(engine, state, tokenize(engine, prompt), max_new_tokens, sampling).text()


# -- Opening a document: encode it, or load its saved state -------------------------

def engine_for(lm: LoadedModel, requested: Mapping[str, Any] | None = None) -> Engine:
    """An engine with the settings asked for (None = not given: the paper's defaults; see LambdaSettings.for_model)."""
    return Engine(lm, LambdaSettings.for_model(lm.adapter.trained_length, **dict(requested or {})))


def open_source(source: Document | str | Path, lm: LoadedModel, requested: Mapping[str, Any] | None = None,
                system: str | None = None, **encode_options: Any) -> tuple[Engine, EncodedDocument]:
    """(engine, encoded document): a Document is encoded (encode_document's options), a path is a saved state.

    Retrieval of middle tokens (the KV stores) is on only when `requested` turns it on: the
    default way to answer from anywhere in a long document is the re-read passage (`ask`'s
    `reread`), which costs no decode time and leaves the window whole (docs/results.md).
    `system`: the system prompt, part of the document's prefix (so a state must be opened
    with the one it was encoded with).
    """
    if isinstance(source, Document):
        engine = engine_for(lm, {**dict(requested or {}), "retrieval": bool((requested or {}).get("retrieval"))})
        return engine, encode_document(engine, source, lm.spec, system=system, **encode_options)
    return open_state(source, lm, requested, system)


def reread_for(retrieval: bool | None, reread: int | None) -> int:
    """Tokens of the passage re-read before a question: as given; else the default
    (DEFAULT_REREAD, used only for documents longer than the window) unless retrieval
    was turned off (--no-retrieval: Λ-attention alone, the paper's method as it is)."""
    if reread is not None:
        return reread
    return 0 if retrieval is False else DEFAULT_REREAD


def open_state(path: str | Path, lm: LoadedModel, requested: Mapping[str, Any] | None = None,
               system: str | None = None) -> tuple[Engine, EncodedDocument]:
    """Load a saved state into an engine built for it.

    The state fixes its cache layout (window, first tokens, cap, chunk, stores); options
    given for those must agree, and a mismatch is refused with both values named.  The
    model is the one the caller loaded: a state never chooses one (its fingerprint must
    match).  Retrieval runs with the state's settings unless asked for otherwise, and
    only where its stores allow.  The system prompt is encoded with the document: it must
    be the one the state was encoded with.
    """
    given = {k: v for k, v in dict(requested or {}).items() if v is not None}
    header = read_header(path)
    settings = header.settings
    layout = {k: given[k] for k in ("n_global", "n_local", "limit_distance", "chunk_size", "kv_quantize") if k in given}
    settings = settings.replace(**layout, middle_dir=given.get("middle_dir"),
                                middle_dtype=given.get("middle_dtype", settings.middle_dtype))
    wants_retrieval = bool(given.get("middle_top_k") or given.get("retrieval"))
    if wants_retrieval and not settings.middle_top_k:
        raise UsageError(f"{header.document_name}: this state was encoded without retrieval; "
                         "encode it again with retrieval on")
    engine = Engine(lm, settings)
    fmt = PromptFormat.for_tokenizer(lm.tokenizer, system)
    if header.model_fingerprint == lm.fingerprint:  # another model: load_state says so first
        _check_system_prompt(header, fmt, PromptFormat.for_tokenizer(lm.tokenizer), system)
    state = load_state(path, engine, header, fmt.fingerprint)
    if wants_retrieval:  # another k, distance or first layer, on the stores the state has
        state.cache.set_retrieval(given.get("middle_top_k") or RETRIEVAL_TOP_K, given.get("middle_from_layer"),
                                  given.get("middle_distance"), given.get("middle_blocks"), given.get("middle_unit"))
    elif given.get("retrieval") is False:  # --no-retrieval on a state that keeps stores
        state.cache.set_retrieval(0)
    ids = read_stream_ids(path, header, lm.model.get_input_embeddings().num_embeddings)
    return engine, EncodedDocument(state, fmt, header, ids)


def _check_system_prompt(header: StateHeader, fmt: PromptFormat, plain: PromptFormat, system: str | None) -> None:
    """Say which system prompt a state needs when that is why its prompt prefix differs."""
    if header.prompt_fingerprint == fmt.fingerprint:
        return
    if system and header.prompt_fingerprint == plain.fingerprint:
        raise UsageError(f"{header.document_name}: this state was encoded without a system prompt, and the system "
                         "prompt is encoded with the document; encode it again with --system to use one")
    if not system:
        raise UsageError(f"{header.document_name}: this state was encoded with another prompt prefix: a system "
                         "prompt (give the same --system as at encode), another chat template or lminf version")
    raise UsageError(f"{header.document_name}: this state was encoded with another system prompt (or another chat "
                     "template or lminf version); give the same --system as at encode")


def section_size(engine: Engine, requested: int | None = None) -> int:
    """Tokens per section for notes: at most half the window, so a section is read whole before its note."""
    if requested is not None:
        if requested <= 0:
            raise SettingsError("section_tokens", f"must be positive, got {requested}")
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
                    on_note: NoteCallback | None = None, system: str | None = None) -> EncodedDocument:
    """Encode  head + document  once; with `notes`, write a note after each section on the way.

    notes: True always, False never, None when the document does not fit in one window
    with `reserve` tokens to spare (room for a summary prompt and the summary).  The
    notes are detours (snapshot, prompt, generate, restore), and no document row is a
    retrieving row (a prompt always follows it), so the encoded state is the same with
    or without notes, and however the document was cut into sections.

    Head and document are tokenized as one text, and the document's last few tokens are
    held back (`header.tail`) and tokenized again with each prompt: the tokens at both
    seams are then those of the whole conversation written out, whatever the tokenizer
    glues together (e.g. "end." + "\n\n" is one token for some and two for others).
    """
    if note_tokens <= 0:
        raise SettingsError("note_tokens", f"must be positive, got {note_tokens}")
    fmt = PromptFormat.for_tokenizer(engine.lm.tokenizer, system)
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
        progress(0, len(stream))  # the total is known before the first chunk (output.EncodeNotice uses it)
    t0 = time.perf_counter()
    state = engine.encode(stream[:n_head], continued=False)
    note_seconds = 0.0
    # Sections are the same with or without notes, so both give bit-identical states.
    bounds = [(a + n_head, b + n_head)
              for a, b in section_bounds(engine, stream[n_head:], section_size(engine, section_tokens))]
    for k, (a, b) in enumerate(bounds):
        def report(done: int, _n: int, a: int = a) -> None:
            if progress is not None:
                progress(a + done, len(stream))

        if b > a:
            engine.encode(stream[a:b], state, continued=False, progress=report)
        if notes:
            t1 = time.perf_counter()
            last = k == len(bounds) - 1
            prompt = (tail if last else "") + fmt.section_note()
            note = f"{NOTE_START} {_note(engine, state, prompt, note_tokens, sampling)}"
            written.append(note)
            note_seconds += time.perf_counter() - t1
            if on_note is not None:
                on_note(k + 1, len(bounds), note)
    header = build_header(engine, state, model_spec, fmt.fingerprint, doc.name, doc.sha256, len(ids) - n_head,
                          len(doc.text), doc.pages, written, tail)
    timings = {"encode": round(time.perf_counter() - t0 - note_seconds, 2), "notes": round(note_seconds, 2)}
    return EncodedDocument(state, fmt, header, torch.tensor(stream, dtype=torch.int32), timings)


def _note(engine: Engine, state: State, prompt: str, note_tokens: int, sampling: SamplingParams | None) -> str:
    """A note on the section just read: it is in the window, so nothing is retrieved for it."""
    keep = state.cache.settings
    if not (keep.retrieves and state.cache.has_middle):
        return generate_text(engine, state, prompt, note_tokens, sampling)
    state.cache.set_retrieval(0)
    try:
        return generate_text(engine, state, prompt, note_tokens, sampling)
    finally:
        state.cache.set_retrieval(keep.middle_top_k, keep.middle_from_layer, keep.middle_distance,
                                  keep.middle_blocks, keep.middle_unit)


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
        sampling: SamplingParams | None = None, reread: int = DEFAULT_REREAD,
        reread_by: str = "words") -> Response:
    """The answer to one question about the encoded document (re-reading a passage first: see `excerpt_for`)."""
    question = check_question(question)
    excerpt = excerpt_for(engine, encoded, question, reread, reread_by)
    prompt = encoded.prompt_ids(engine, encoded.fmt.question(question, excerpt))
    return reply(engine, encoded.state, prompt, max_new_tokens, sampling)


def excerpt_for(engine: Engine, encoded: EncodedDocument, question: str, reread: int,
                reread_by: str = "words") -> str | None:
    """The passage of `reread` tokens the question is about, to write out again right before it.

    A small model reads a fact reliably only from a short distance (docs/results.md): for
    a document longer than the window, the passage is found by the question's words
    (`reread_by="words"`, BM25) or by where the model's own retrieval looks ("attention",
    with retrieval on; see `locate`), and re-read close to the question.  None when
    `reread` is 0, the document fits the window (then everything is read directly, as
    before), or no passage is found.
    """
    if reread_by not in REREAD_BY:
        raise SettingsError("reread_by", f"must be {' or '.join(REREAD_BY)}, got {reread_by!r}")
    if reread < 0:
        raise SettingsError("reread", f"must be 0 (off) or a number of tokens, got {reread}")
    if not reread or not encoded.outgrows_window or encoded.ids is None:
        return None
    if reread_by == "words":
        span = locate_words(engine, encoded, question, reread)
    else:
        span = locate(engine, encoded, encoded.prompt_ids(engine, encoded.fmt.question(question)), reread)
    return None if span is None else passage_text(engine, encoded.ids[span[0]:span[1]])


def locate_words(engine: Engine, encoded: EncodedDocument, question: str, span: int) -> tuple[int, int] | None:
    """The `span` stream positions of the document whose words best match the question's (BM25 over
    passages that overlap by three quarters, so a short fact lies whole inside one of them),
    or None when no passage shares a word with it.

    The whole document is searched, the window too: a small model misses a fact a few
    thousand tokens back inside its own window as well (a needle at depth 0.7 of 16k tokens,
    5k tokens before the question, was missed until re-read: docs/results.md).
    """
    ids = encoded.ids
    lo, hi = 0, len(ids)
    if hi - lo <= 0:
        return None
    step = max(1, span // 4)
    starts = list(range(lo, max(lo + 1, hi - span + step), step))
    texts = [engine.lm.tokenizer.decode(ids[a:a + span].tolist()) for a in starts]
    scores = bm25_scores(texts, question)
    top = max(scores)
    if top <= 0:
        return None
    best = starts[max(range(len(scores)), key=scores.__getitem__)]
    # Centre the passage on its matches, so the sentence holding them comes with context on both sides.
    pieces = [engine.lm.tokenizer.decode([t]) for t in ids[best:best + span].tolist()]
    ends = list(itertools.accumulate(len(p) for p in pieces))                   # where each token's text ends
    wanted = set(terms(question))
    hits = [bisect.bisect_right(ends, m.start()) for m in re.finditer(r"[^\W_]+", "".join(pieces))
            if m.group().lower() in wanted]
    if hits:
        best += (hits[0] + hits[-1]) // 2 - span // 2
    best = max(lo, min(best, max(lo, hi - span)))
    return best, min(len(ids), best + span)


def locate(engine: Engine, encoded: EncodedDocument, prompt_ids: Sequence[int], span: int) -> tuple[int, int] | None:
    """Where the model looks for the answer to a prompt: the `span` stream positions holding most of the
    middle tokens that the prompt's last row retrieves, over every retrieving layer and head.

    The prompt is run as a detour (the state is restored); None when nothing retrieves.
    """
    state, cache = encoded.state, encoded.state.cache
    stores = [layer.middle for layer in cache.layers if layer.middle is not None]
    if not cache.settings.retrieves or not stores:
        return None
    snap = state.snapshot(len(prompt_ids))
    try:
        for store in stores:
            store.last_hits = None
        engine.encode(prompt_ids, state)  # its last row retrieves, in every layer from middle_from_layer
        hits = [store.last_hits.flatten().cpu() for store in stores if store.last_hits is not None]
    finally:
        state.restore(snap)
    if not hits:
        return None
    # The store holds the stream's middle in order, from position n_global.
    pos = torch.sort(torch.cat(hits) + cache.settings.n_global).values                  # [hits]
    ends = torch.searchsorted(pos, pos + span)                                           # window [p, p + span)
    best = int(torch.argmax(ends - torch.arange(len(pos))))                              # most hits inside
    inside = pos[best:int(ends[best])].double()
    a = max(0, int(inside.mean()) - span // 2)
    length = cache.length if encoded.ids is None else len(encoded.ids)
    return min(a, max(0, length - span)), min(length, a + span)


def passage_text(engine: Engine, ids: Tensor) -> str:
    """Token ids of a passage as text, cut to whole lines or sentences at both ends where it can be."""
    text = engine.lm.tokenizer.decode(ids.tolist())
    n = len(text)
    for mark in ("\n", ". "):
        a = text.find(mark)
        if 0 <= a < n // 4:
            text = text[a + len(mark):]
            break
    for mark in ("\n", ". "):
        b = text.rfind(mark)
        if b > 3 * len(text) // 4:
            text = text[:b + 1]
            break
    return text.strip()


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
                   progress: Progress | None = None) -> list[str]:
    """Merge consecutive notes, MERGE_GROUP at a time, until the request over them fits `budget_tokens`."""
    fmt = encoded.fmt
    while len(notes) > 1 and len(encoded.prompt_ids(engine, fmt.part_summary(1, 1, notes))) > budget_tokens:
        groups = [notes[i:i + MERGE_GROUP] for i in range(0, len(notes), MERGE_GROUP)]
        merged = []
        for i, g in enumerate(groups):
            merged.append(g[0] if len(g) == 1 else generate_text(
                engine, encoded.state, encoded.header.tail + fmt.merge_notes(g), note_tokens, sampling))
            if progress is not None:
                progress(i + 1, len(groups))
        notes = merged
    return notes


def notes_budget(engine: Engine) -> int:
    """Tokens the notes prompt may take: half the window, the rest stays for the document's end."""
    return engine.settings.n_local // 2


class Summary(Response):
    """A summary: written in full before it is handed out (it is checked first), with how it was made.

    A summary from notes is written part by part (see `summarize`); a part whose reply says
    nothing about the content (shorter than a sentence, or about "the document" ending:
    what SmolLM2 answered to the first wording) is replaced by that part's notes
    (`fallback_parts`, 1-based), so a summary is never empty or meta.
    """

    def __init__(self, stream: Iterator[GenerationResponse], prompt_tokens: int, notes: list[str],
                 source_notes: list[str], covers_whole_document: bool, timings: dict[str, float],
                 control: ReplyControl | None = None, fallback_parts: list[int] | None = None) -> None:
        super().__init__(stream, prompt_tokens, control)
        self.notes = notes                    # the notes it was written from (condensed), if any
        self.source_notes = source_notes      # the section notes as written while reading
        self.covers_whole_document = covers_whole_document  # False: no notes, longer than the window
        self.timings = timings                # seconds: encode, notes, condense, summary
        self.fallback_parts = fallback_parts if fallback_parts is not None else []  # filled while it is written

    @property
    def fallback(self) -> bool:
        """Whether notes stand in for some part of the reply that said nothing."""
        return bool(self.fallback_parts)

    def __iter__(self) -> Iterator[str]:
        if not self._done:
            t0 = time.perf_counter()
            for _ in super().__iter__():
                pass
            self.timings["summary"] = round(time.perf_counter() - t0, 2)
        yield from self._chunks


_META = re.compile(r"\b(the |this )?(document|text|passage) (has )?(ended|ends|is over)\b"
                   r"|\bend of the (document|text)\b|\bas an ai\b|\bi (cannot|can't|am unable to)\b", re.IGNORECASE)


def says_nothing(text: str, cut: bool = False) -> bool:
    """A reply that is no summary: under a sentence (8 words) although nothing cut it short, or whose
    first sentence is about the document ending or the model itself."""
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    return (len(text.split()) < 8 and not cut) or bool(_META.search(first))


# Capitalised words that are titles or roles, not names ("the King of Norway", "the Ghost").
_TITLES = frozenset({"king", "queen", "prince", "princess", "lord", "lady", "duke", "duchess", "sir", "master",
                     "mistress", "god", "mr", "mrs", "dr", "saint", "st", "captain", "general"})
_SENTENCES = re.compile(r"(?<=[.!?:;])\s+|\n+|\s-\s")


def names_in(text: str) -> set[str]:
    """Lower-cased proper names in text: capitalised words that do not open a sentence, are not
    titles, and never appear in lower case in the same text ("Ghost" beside "ghost" is no name)."""
    skip = set(re.findall(r"\b[a-z][\w'’]+", text)) | _TITLES | STOPWORDS  # once, not per word
    out = set()
    for sentence in _SENTENCES.split(text):
        for word in re.findall(r"[\w'’]+", sentence.strip(" \"'(*"))[1:]:
            w = re.sub(r"['’]s?$", "", word)
            if re.match(r"i['’]", w, re.IGNORECASE):  # I've, I'm, I'll
                continue
            if w[:1].isupper() and len(w) > 1 and w.lower() not in skip:
                out.add(w.lower())
    return out


def names_nobody(reply: str, notes: Sequence[str]) -> bool:
    """A part's reply that names none of the people, places or subjects its notes name (when they
    name any): the request asked for them, and without them a reader cannot tell the parts apart."""
    named = names_in("\n".join(notes))  # "In this passage, Iago ...": Iago is not an opener
    return bool(named) and not named & set(terms(reply))  # names are never stopwords or one letter


def richest_note(notes: Sequence[str]) -> str:
    """The note of a run that says something and names the most (the first of equals), as text, to its
    second sentence ("" when every note is empty)."""
    bodies = [(n, t) for n in notes if (t := notes_as_text([n]))]
    if not bodies:
        return ""
    _, text = max(bodies, key=lambda nt: (not says_nothing(nt[1]), len(names_in(nt[0]))))
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[1]] if len(ends) > 1 else text


def notes_as_text(notes: Sequence[str]) -> str:
    """Section notes as a summary of their own: one paragraph each, in order, without their opener."""
    out = []
    for note in notes:
        body = note.strip().removeprefix(NOTE_START).strip()
        if body:
            out.append(body[0].upper() + body[1:])
    return "\n\n".join(out)


# --length -> (parts a summary from notes is written in, paragraphs they are grouped into)
SUMMARY_PARTS = {"short": (3, 1), "medium": (5, 2), "long": (8, 8)}
PART_MIN_TOKENS = 48  # a part's budget is at least two short sentences (else fewer parts)


def summarize(engine: Engine, encoded: EncodedDocument, length: str = "medium", max_new_tokens: int | None = None,
              sampling: SamplingParams | None = None, note_tokens: int = NOTE_TOKENS,
              progress: Progress | None = None) -> Summary:
    """A summary of the encoded document.

    With section notes (a document longer than the window), it is written part by part:
    the notes are split into runs of consecutive sections (SUMMARY_PARTS by `length`), and
    each run is summarized in a sentence or two after the document, in order.  (One request
    over all the notes let the embedded model write about the first one or two parts and
    stop: docs/documents.md.)  A run too long for the notes budget is condensed first, with
    `progress` per merge.  Without notes, one request covers what the cache holds.
    """
    budget = max_new_tokens if max_new_tokens is not None else summary_length(length)[1]
    plan = plan_summary(engine, encoded, length, budget)
    control = ReplyControl()
    if not plan.notes:
        prompt = encoded.prompt_ids(engine, encoded.fmt.summary(length))
        return Summary(_reply_stream(engine, encoded.state, prompt, budget, sampling, control), len(prompt), [],
                       [], plan.covers_whole_document, {**encoded.timings, "condense": 0.0}, control)
    n_parts, paragraphs = SUMMARY_PARTS.get(length, SUMMARY_PARTS["medium"])
    n_parts = max(1, min(n_parts, budget // PART_MIN_TOKENS))  # fewer parts for a small -n: never over it
    t0 = time.perf_counter()
    parts = [condense_notes(engine, encoded, run, notes_budget(engine), sampling, 2 * note_tokens, progress)
             for run in summary_parts(plan.notes, n_parts)]
    condense = round(time.perf_counter() - t0, 2)
    each = budget // len(parts)
    prompts = [encoded.prompt_ids(engine, encoded.fmt.part_summary(k, len(parts), run))
               for k, run in enumerate(parts, 1)]
    fell_back: list[int] = []
    stream = _parts_stream(engine, encoded.state, prompts, parts, each, paragraphs, sampling, control, fell_back)
    return Summary(stream, sum(map(len, prompts)), [n for run in parts for n in run], list(encoded.notes), True,
                   {**encoded.timings, "condense": condense}, control, fell_back)


def summary_parts(notes: Sequence[str], n: int) -> list[list[str]]:
    """The notes in `n` runs of consecutive notes, as even as can be (one run a note when fewer)."""
    n = max(1, min(n, len(notes)))
    cuts = [round(i * len(notes) / n) for i in range(n + 1)]
    return [list(notes[cuts[i]:cuts[i + 1]]) for i in range(n)]


def _parts_stream(engine: Engine, state: State, prompts: Sequence[Sequence[int]], parts: Sequence[Sequence[str]],
                  each: int, paragraphs: int, sampling: SamplingParams | None,
                  control: ReplyControl, fell_back: list[int]) -> Iterator[GenerationResponse]:
    """The replies to the part prompts, one after another from the same document state, as one
    stream: tokens pass through (counted, timed), each part's text comes whole once it is checked
    (a reply that says nothing, or names nobody its notes name, gives way to its run's richest
    note, and its number goes to `fell_back`), and parts are joined into
    `paragraphs` paragraphs.  The last response carries the finish reason: "cancelled" if it
    was, else that of the last part."""
    per_paragraph = -(-len(prompts) // max(1, paragraphs))
    generated, last = 0, None
    for k, (prompt, notes) in enumerate(zip(prompts, parts, strict=True)):
        pieces, done = [], None
        for r in _reply_stream(engine, state, prompt, each, sampling, control):
            pieces.append(r.text)
            if r.token is not None:
                yield dataclasses.replace(r, text="", generated=generated + r.generated)
            if r.finish_reason is not None:
                done = r
        text = "".join(pieces).strip()
        if done is not None and done.finish_reason == "length":  # a part cut by its budget ends at a sentence
            text = text[:_last_sentence_end(text, 0)].strip() or text
        # A reply that is no summary, or names nobody its notes name ("The Ghost tells the story of a
        # king's ghost" for Hamlet's notes), gives way to its run's most informative note: a run's
        # notes in full would be several times the part's budget.
        if (says_nothing(text, cut=done is not None and done.finish_reason == "length")
                or names_nobody(text, notes)) and notes_as_text(notes):
            text = richest_note(notes)
            fell_back.append(k + 1)
        if done is not None:
            generated += done.generated
            last = done
        sep = "" if k == 0 else ("\n\n" if k % per_paragraph == 0 else " ")
        yield GenerationResponse(sep + text, None, generated, last.generation_tps if last else 0.0,
                                 last.peak_memory_bytes if last else 0)
        if control.cancelled:
            break
    reason = "cancelled" if control.cancelled else (last.finish_reason if last else "stop")
    yield GenerationResponse("", None, generated, last.generation_tps if last else 0.0,
                             last.peak_memory_bytes if last else 0, reason)


def summarize_source(source: Document | str | Path, lm: LoadedModel, requested: Mapping[str, Any] | None = None,
                     length: str = "medium", max_new_tokens: int | None = None,
                     sampling: SamplingParams | None = None, section_tokens: int | None = None,
                     note_tokens: int = NOTE_TOKENS, progress: Progress | None = None,
                     on_note: NoteCallback | None = None,
                     system: str | None = None) -> tuple[Engine, EncodedDocument, Summary]:
    """`lminf summarize` in one call: open the document (section notes are written while it is read,
    when it and a summary overflow one window) or its saved state, then summarize it."""
    budget = max_new_tokens if max_new_tokens is not None else summary_length(length)[1]
    options = {} if not isinstance(source, Document) else {
        "notes": None, "reserve": budget + SUMMARY_PROMPT_RESERVE, "section_tokens": section_tokens,
        "note_tokens": note_tokens, "sampling": sampling, "progress": progress, "on_note": on_note}
    engine, encoded = open_source(source, lm, requested, system=system, **options)
    return engine, encoded, summarize(engine, encoded, length, budget, sampling, note_tokens)


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
                 max_new_tokens: int = DEFAULT_ANSWER_TOKENS, sampling: SamplingParams | None = None,
                 reread: int = DEFAULT_REREAD, reread_by: str = "words") -> None:
        if history < 0:
            raise SettingsError("history", f"must be >= 0, got {history}")
        self.engine, self.encoded = engine, encoded
        self.history, self.max_new_tokens, self.sampling = history, max_new_tokens, sampling
        self.reread, self.reread_by = reread, reread_by
        self.turns: list[Turn] = []
        self.transcript: list[Turn] = []  # everything said, /reset or not

    def prompt_ids(self, question: str, excerpt: str | None = None) -> list[int]:
        """History turns (question + answer tokens) followed by the new question (after a re-read passage)."""
        fmt, kept = self.encoded.fmt, self.turns[-self.history:] if self.history else []
        ids: list[int] = []
        for i, turn in enumerate(kept):
            if i == 0:
                ids += self.encoded.prompt_ids(self.engine, fmt.question(turn.question))
            else:
                ids += tokenize(self.engine, fmt.follow_up(turn.question))
            ids += turn.answer_ids
        if kept:
            return ids + tokenize(self.engine, fmt.follow_up(question, excerpt))
        return self.encoded.prompt_ids(self.engine, fmt.question(question, excerpt))

    def ask(self, question: str) -> Response:
        """The answer; the exchange joins the history once the answer is complete (not when cancelled)."""
        question = check_question(question)
        excerpt = excerpt_for(self.engine, self.encoded, question, self.reread, self.reread_by)
        response = reply(self.engine, self.encoded.state, self.prompt_ids(question, excerpt), self.max_new_tokens,
                         self.sampling)

        def keep(done: Response) -> None:
            turn = Turn(question, done.text(), list(done.token_ids))
            if done.finish_reason != "cancelled":  # an interrupted answer is not replayed to the model
                self.turns.append(turn)
            self.transcript.append(turn)

        response.on_complete = keep
        return response

    def reset(self) -> None:
        """Forget the conversation; the next answer depends on the document alone."""
        self.turns.clear()

    def transcript_text(self) -> str:
        """The conversation so far as plain text (Q:/A: pairs)."""
        return "".join(f"Q: {t.question}\nA: {t.answer}\n\n" for t in self.transcript)
