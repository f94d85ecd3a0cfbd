"""Reading documents: text files, PDFs and stdin, with one-line errors for bad input."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

PDF_MAGIC = b"%PDF-"
BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


@dataclass
class Document:
    """A document's text and where it came from."""

    name: str
    text: str
    pages: int | None = None


def read_document(source: str, stdin: BinaryIO | None = None) -> Document:
    """Read a path (or '-' for stdin) as text; PDFs are extracted page by page."""
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return _from_bytes("<stdin>", stream.read())
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"no such file: {source}")
    if path.is_dir():
        raise InputError(f"{source} is a directory, not a document")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from exc
    return _from_bytes(source, data)


def _from_bytes(name: str, data: bytes) -> Document:
    if not data.strip():
        raise InputError(f"{name} is empty")
    if data.startswith(PDF_MAGIC):
        return _from_pdf(name, data)
    text = decode_text(name, data)
    if not text.strip():
        raise InputError(f"{name} is empty")
    return Document(name=name, text=text)


def decode_text(name: str, data: bytes) -> str:
    """Bytes -> str: BOM-marked UTF-8/16, else strict UTF-8; binary is refused."""
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise InputError(f"{name} is not valid {encoding} text (byte {exc.start})") from exc
    if b"\x00" in data[:8192]:
        raise InputError(f"{name} looks like a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not valid UTF-8 text (undecodable byte at offset {exc.start})") from exc


def _from_pdf(name: str, data: bytes) -> Document:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise InputError(f"{name} is an encrypted PDF; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except InputError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(f"{name} is not a readable PDF ({exc.__class__.__name__})") from exc
    text = "\n\n".join(p.strip() for p in pages)
    if not text.strip():
        raise InputError(f"{name} has no text layer (scanned PDF?); run OCR first")
    return Document(name=name, text=text, pages=len(pages))
