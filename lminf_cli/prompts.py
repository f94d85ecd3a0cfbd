"""Prompt text for document tasks, laid out with the model's own chat template when it has one.

A document is encoded once as  head + intro + document  (the first user message,
left open), and every task appends its own text after it: a question, a request for
notes on the section just read, or a request for a summary, each closing the user
message and opening the assistant's reply.  Splitting a rendered template at marker
strings gives those pieces for any template, so nothing here knows a model family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ModelError, UsageError

# Bump when any wording below changes: saved states record it, and a state encoded
# with other wording is refused (its document prefix would not match).
PROMPT_VERSION = 1

_MARKS = ("\u27e6lminf-user-1\u27e7", "\u27e6lminf-assistant-1\u27e7", "\u27e6lminf-user-2\u27e7")

DOC_INTRO = "Read the following document. Questions about it come after it.\n\n"
QUESTION_FIRST = "Keep this question in mind while reading; it is asked again after the document: {q}\n\n"
FIRST_QUESTION = "\n\nAnswer this question about the document above, briefly and precisely.\nQuestion: {q}"
# A passage of the document re-read right before the question (tasks.ask with `reread`): the
# small model reads a fact reliably only from a short distance.
EXCERPT = "\n\nHere is again the passage of the document above that the question is about:\n\n{passage}"
NEXT_QUESTION = "Another question about the document: {q}"
# Measured on SmolLM2-135M: quoting the section's first words made it copy them, and
# without a start to its reply it went on with the document; a plain request and a
# reply opened for it ("In this passage,") give prose notes.
SECTION_NOTE = ("\n\nStop reading for a moment. Summarize the passage you just read in two or three "
                "sentences of plain prose: who is in it and what happens.")
NOTE_START = "In this passage,"
# One part of a summary written from the notes of a run of consecutive sections.  A small
# model asked for one summary of a dozen notes wrote about the first one or two
# (docs/documents.md): asked about each stretch of the document in turn, it covers them all.
PART_SUMMARY = ("\n\nNotes on part {k} of {n} of the document above:\n\n{notes}\n\n"
                "In one or two sentences, say what happens in this part of the document, "
                "naming its main people, places and subjects.")
DIRECT_SUMMARY = "\n\nWrite {length} of the whole document above, from beginning to end."

# --length -> (wording, default token budget for the answer)
SUMMARY_LENGTHS: dict[str, tuple[str, int]] = {
    "short": ("a short summary (three to five sentences)", 160),
    "medium": ("a summary of one or two paragraphs", 350),
    "long": ("a detailed summary of several paragraphs", 700),
}


@dataclass(frozen=True)
class PromptFormat:
    """Conversation pieces: head + user text + user_end + reply + assistant_end + user text + ..."""

    head: str            # everything before the first user message's text (system prompt, BOS ...)
    user_end: str        # closes a user message and opens the assistant's reply
    assistant_end: str   # closes a reply and opens the next user message
    templated: bool      # True when taken from the tokenizer's chat template

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, system: str | None = None) -> PromptFormat:
        """The model's chat template cut at markers, or a plain-text layout for base models.

        `system`: a system prompt, rendered by the template as its system message.  It is
        part of the head, so of every encoded document's prefix (and of the fingerprint).
        A template without a system role gets it at the start of the first user message;
        a plain layout, as the first paragraph.
        """
        system = (system or "").strip() or None
        if getattr(tokenizer, "chat_template", None):
            fmt = _from_template(tokenizer, system)
            if fmt is None and system is not None:
                # Some templates refuse a system message (Gemma's): the prompt then opens the user's turn.
                fmt = _from_template(tokenizer, None)
                if fmt is not None:
                    fmt = dataclasses.replace(fmt, head=fmt.head + system + "\n\n")
            if fmt is not None:
                return fmt
        bos = getattr(tokenizer, "bos_token", None)
        adds_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [tokenizer.bos_token_id]
        head = (bos if adds_bos else "") + (system + "\n\n" if system else "")
        return cls(head=head, user_end="\n\nAnswer:", assistant_end="\n\n", templated=False)

    @property
    def fingerprint(self) -> str:
        """Identifies the exact document prefix, so saved states can be checked against it."""
        raw = "\x1f".join((str(PROMPT_VERSION), self.head, self.user_end, self.assistant_end, DOC_INTRO))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def document_head(self, question_first: str | None = None) -> str:
        """Text before the document; `question_first` puts the question in the global tokens too."""
        first = QUESTION_FIRST.format(q=check_question(question_first)) if question_first else ""
        return self.head + first + DOC_INTRO

    def question(self, question: str, excerpt: str | None = None) -> str:
        """Appended right after the document: the question (after a re-read passage of the document,
        when given), then the assistant's turn opens."""
        again = EXCERPT.format(passage=excerpt.strip()) if excerpt else ""
        return again + FIRST_QUESTION.format(q=check_question(question)) + self.user_end

    def follow_up(self, question: str, excerpt: str | None = None) -> str:
        """Appended after a previous answer: closes it and asks the next question (after a re-read
        passage, when given)."""
        again = EXCERPT.format(passage=excerpt.strip()).removeprefix("\n\n") + "\n\n" if excerpt else ""
        return self.assistant_end + again + NEXT_QUESTION.format(q=check_question(question)) + self.user_end

    def section_note(self) -> str:
        """Appended after a section of the document: asks for notes on it and opens the reply with NOTE_START."""
        return SECTION_NOTE + self.user_end + NOTE_START

    def summary(self, length: str) -> str:
        """Appended after the whole document (one that fits the window): asks for a summary of it."""
        return DIRECT_SUMMARY.format(length=summary_length(length)[0]) + self.user_end

    def part_summary(self, k: int, n: int, notes: Sequence[str]) -> str:
        """Appended after the whole document: asks for the summary of its part k of n, from that part's notes."""
        listed = "\n".join(f"- {note}" for note in notes)
        return PART_SUMMARY.format(k=k, n=n, notes=listed) + self.user_end

    def merge_notes(self, notes: Sequence[str]) -> str:
        """Appended after the document: asks to condense consecutive notes into one."""
        listed = "\n".join(f"{i}. {note}" for i, note in enumerate(notes, 1))
        return ("\n\nNotes on consecutive parts of the document:\n\n" + listed
                + "\n\nCombine these notes into one note of three or four sentences, keeping the order."
                + self.user_end)


# -- Rendering a chat template, bounded ----------------------------------------------
# A chat template is Jinja from the model's files: transformers renders it in a sandbox
# (no file or attribute access), but nothing stops it from looping for hours (nested
# range() loops) or building gigabytes of text.  Real templates are a few KB and render
# in milliseconds, so these bounds never touch them.
TEMPLATE_CHARS = 256 * 1024   # longest template accepted
TEMPLATE_SECONDS = 2.0        # longest one rendering may take
TEMPLATE_SLACK = 1 << 20      # characters a rendering may add to the messages' own


class TemplateError(ModelError):
    """The chat template itself failed (raised an error): callers may fall back to plain text."""


class _Expired(BaseException):
    """The time bound ran out.  A BaseException, so that no `except Exception` inside Jinja or
    transformers can swallow it on the way out."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _Expired in this thread once `seconds` have passed.

    On the main thread a SIGALRM timer interrupts any Python code at no cost.  Signals
    reach only the main thread, so elsewhere (a server, a notebook's worker) a trace
    function checks the clock at every line the template's compiled code runs; slower,
    but a template is small.  Neither can stop one long C call (a single huge string
    multiplication): TEMPLATE_SLACK catches its result afterwards.
    """
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def expire(_signum: int, _frame: Any) -> None:
            raise _Expired

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            try:  # nested, so the handler is put back even if the timer fires right here
                signal.setitimer(signal.ITIMER_REAL, 0)
            finally:
                signal.signal(signal.SIGALRM, previous)
        return
    deadline = time.monotonic() + seconds
    previous_trace = sys.gettrace()

    def trace(_frame: Any, _event: str, _arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Expired
        return trace

    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous_trace)


def render_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template applied to messages, as text, within TEMPLATE_* bounds.

    Too large, too slow or too much output: ModelError.  A template that raises an
    error of its own: TemplateError (a ModelError too).
    """
    template = getattr(tokenizer, "chat_template", None)
    size = sum(len(str(t)) for t in template.values()) if isinstance(template, dict) else len(str(template or ""))
    if size > TEMPLATE_CHARS:
        raise ModelError(f"the model's chat template is {size:,} characters long (over {TEMPLATE_CHARS:,}): "
                         "refusing to run it")
    try:
        with _time_limit(TEMPLATE_SECONDS):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except _Expired:
        raise ModelError(f"the model's chat template took over {TEMPLATE_SECONDS:g} s to lay out a conversation "
                         "(real ones take milliseconds): refusing to run it") from None
    except Exception as exc:  # noqa: BLE001 - templates are arbitrary Jinja: any error is the template's
        raise TemplateError(f"the model's chat template failed: {exc.__class__.__name__}: "
                            f"{' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(text, str):
        raise TemplateError("the model's chat template did not render to text")
    budget = sum(len(m["content"]) for m in messages) + TEMPLATE_SLACK
    if len(text) > budget:
        raise ModelError(f"the model's chat template turned a conversation into {len(text):,} characters, "
                         f"over {TEMPLATE_SLACK:,} more than its messages: refusing to use it")
    return text


def _from_template(tokenizer: Any, system: str | None = None) -> PromptFormat | None:
    u1, a1, u2 = _MARKS
    messages = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": u2}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        three = render_template(tokenizer, messages)
        one = render_template(tokenizer, messages[:2] if system is not None else messages[:1])
    except TemplateError:  # e.g. a template that insists on a system message: use plain text
        return None
    if not isinstance(three, str) or not isinstance(one, str) or any(three.count(m) != 1 for m in _MARKS):
        return None
    head, rest = three.split(u1)
    _, rest = rest.split(a1)
    assistant_end, _ = rest.split(u2)
    if one.count(u1) != 1 or not one.startswith(head):
        return None
    # The one-turn render ends with the generation prompt: what opens the reply we want.
    user_end = one.split(u1)[1]
    return PromptFormat(head=head, user_end=user_end, assistant_end=assistant_end, templated=True)


def check_question(question: str | None) -> str:
    """A question with surrounding whitespace removed; empty ones are refused.

    Bytes that are not UTF-8 (an argument in another encoding reaches Python as lone
    surrogates) become U+FFFD: tokenizers refuse surrogates outright.
    """
    q = (question or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
    if not q:
        raise UsageError("the question is empty")
    return q


def summary_length(length: str) -> tuple[str, int]:
    """--length value -> (wording, default answer budget in tokens)."""
    try:
        return SUMMARY_LENGTHS[length]
    except KeyError:
        raise UsageError(f"--length must be one of {', '.join(SUMMARY_LENGTHS)}, got '{length}'") from None
