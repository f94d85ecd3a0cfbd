"""Writing small PDFs for tests, by hand (no PDF library needed to create them).

Text is drawn with the standard Helvetica font, so any PDF reader can extract it.
"""

from __future__ import annotations

import io

PAGE_W, PAGE_H = 612, 792


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _content(columns: list[list[str]], size: int = 11) -> bytes:
    """Draw each column of lines top to bottom; columns side by side, emitted one after another."""
    width = (PAGE_W - 144) / max(1, len(columns))
    ops = []
    for c, lines in enumerate(columns):
        x = 72 + c * width
        ops.append(f"BT /F1 {size} Tf {size + 3} TL {x:.0f} {PAGE_H - 72} Td")
        for line in lines:
            ops.append(f"({_escape(line)}) Tj T*")
        ops.append("ET")
    return "\n".join(ops).encode("cp1252", errors="replace")  # WinAnsiEncoding


def make_pdf(pages: list[list[list[str]]]) -> bytes:
    """A PDF whose page i draws pages[i] (a list of columns, each a list of lines).

    An empty column list gives a page without any text (like a scanned image page).
    """
    objects: list[bytes] = []
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for i, columns in enumerate(pages):
        stream = _content(columns) if columns else b"0 0 m 10 10 l S"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] "
                       f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode())
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for num, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{num} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def encrypt_pdf(data: bytes, user_password: str = "secret", owner_password: str = "owner") -> bytes:
    """The same PDF encrypted with RC4-128 (pypdf needs no extra crypto package for it)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
