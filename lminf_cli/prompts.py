"""Prompt text for document tasks, laid out with the model's own chat template when it has one.

A document is encoded once as  head + intro + document  (the first user message,
left open), and every task appends its own text after it: a question, a request for
notes on the section just read, or a request for a summary, each closing the user
message and opening the assistant's reply.  Splitting a rendered template at marker
strings gives those pieces for any template, so nothing here knows a model family.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

# Bump when any wording below changes: saved states record it, and a state encoded
# with other wording is refused (its document prefix would not match).
PROMPT_VERSION = 1

_MARKS = ("\u27e6lminf-user-1\u27e7", "\u27e6lminf-assistant-1\u27e7", "\u27e6lminf-user-2\u27e7")

DOC_INTRO = "Read the following document. Questions about it come after it.\n\n"
QUESTION_FIRST = "Keep this question in mind while reading; it is asked again after the document: {q}\n\n"
FIRST_QUESTION = "\n\nAnswer this question about the document above, briefly and precisely.\nQuestion: {q}"
NEXT_QUESTION = "Another question about the document: {q}"
# Measured on SmolLM2-135M: quoting the section's first words made it copy them, and
# without a start to its reply it went on with the document; a plain request and a
# reply opened for it ("In this passage,") give prose notes.
SECTION_NOTE = ("\n\nStop reading for a moment. Summarize the passage you just read in two or three "
                "sentences of plain prose: who is in it and what happens.")
NOTE_START = "In this passage,"
NOTES_SUMMARY = ("\n\nThe document has ended. Notes on its successive parts, in order:\n\n{notes}\n\n"
                 "Using these notes and what you read, write {length} of the whole document, "
                 "from beginning to end.")
DIRECT_SUMMARY = "\n\nThe document has ended. Write {length} of the whole document, from beginning to end."

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

    def question(self, question: str) -> str:
        """Appended right after the document: the question, then the assistant's turn opens."""
        return FIRST_QUESTION.format(q=check_question(question)) + self.user_end

    def follow_up(self, question: str) -> str:
        """Appended after a previous answer: closes it and asks the next question."""
        return self.assistant_end + NEXT_QUESTION.format(q=check_question(question)) + self.user_end

    def section_note(self) -> str:
        """Appended after a section of the document: asks for notes on it and opens the reply with NOTE_START."""
        return SECTION_NOTE + self.user_end + NOTE_START

    def summary(self, length: str, notes: Sequence[str] = ()) -> str:
        """Appended after the whole document: asks for a summary (from section notes when given)."""
        wording = summary_length(length)[0]
        if not notes:
            return DIRECT_SUMMARY.format(length=wording) + self.user_end
        listed = "\n".join(f"{i}. {note}" for i, note in enumerate(notes, 1))
        return NOTES_SUMMARY.format(notes=listed, length=wording) + self.user_end

    def merge_notes(self, notes: Sequence[str]) -> str:
        """Appended after the document: asks to condense consecutive notes into one."""
        listed = "\n".join(f"{i}. {note}" for i, note in enumerate(notes, 1))
        return ("\n\nNotes on consecutive parts of the document:\n\n" + listed
                + "\n\nCombine these notes into one note of three or four sentences, keeping the order."
                + self.user_end)


def _from_template(tokenizer: Any, system: str | None = None) -> PromptFormat | None:
    u1, a1, u2 = _MARKS
    messages = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": u2}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        three = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        first = messages[:2] if system is not None else messages[:1]
        one = tokenizer.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates are arbitrary Jinja; any failure means "use plain text"
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
    """A question with surrounding whitespace removed; empty ones are refused."""
    q = (question or "").strip()
    if not q:
        raise UsageError("the question is empty")
    return q


def summary_length(length: str) -> tuple[str, int]:
    """--length value -> (wording, default answer budget in tokens)."""
    try:
        return SUMMARY_LENGTHS[length]
    except KeyError:
        raise UsageError(f"--length must be one of {', '.join(SUMMARY_LENGTHS)}, got '{length}'") from None
