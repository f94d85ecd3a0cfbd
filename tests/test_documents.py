"""Reading documents: encodings, PDFs (generated here), several files, stdin, and bad input."""

from __future__ import annotations

import io

import pytest
from pdfs import encrypt_pdf, make_pdf

from lminf_cli.documents import clean_pdf_text, decode_bytes, estimate_tokens, read_document, read_documents
from lminf_cli.errors import InputError

FRENCH = ("Longtemps, je me suis couché de bonne heure. Parfois, à peine ma bougie éteinte, mes yeux se "
          "fermaient si vite que je n'avais pas le temps de me dire : « Je m'endors. » Et, une demi-heure "
          "après, la pensée qu'il était temps de chercher le sommeil m'éveillait.")
POLISH = ("Litwo! Ojczyzno moja! ty jesteś jak zdrowie. Ile cię trzeba cenić, ten tylko się dowie, kto cię "
          "stracił. Dziś piękność twą w całej ozdobie widzę i opisuję, bo tęsknię po tobie.")
RUSSIAN = "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему. " * 3
JAPANESE = ("吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた"
            "事だけは記憶している。吾輩はここで始めて人間というものを見た。しかもあとで聞くとそれは書生という人間中で"
            "一番獰悪な種族であったそうだ。")


@pytest.mark.parametrize("text,encoding", [
    (FRENCH, "utf-8"), (FRENCH, "latin-1"), (FRENCH, "cp1252"), (POLISH, "cp1250"),
    (RUSSIAN, "koi8-r"), (RUSSIAN, "cp1251"), (JAPANESE, "shift_jis"), (JAPANESE, "euc_jp"), (FRENCH, "utf-16"),
    (FRENCH, "utf-16-le"), (FRENCH, "utf-8-sig"),
])
def test_text_in_common_encodings_is_decoded(tmp_path, text, encoding):
    # Detection needs a sentence or two: a few words are ambiguous between legacy code pages.
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode(encoding))
    doc = read_document(str(path))
    assert doc.text == text
    assert doc.pages is None and doc.encoding


def test_line_endings_are_normalised(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"one\r\ntwo\r\n")
    assert read_document(str(path)).text == "one\ntwo\n"


@pytest.mark.parametrize("data,message", [
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8, "binary"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), "binary"),
    (bytes([1, 2, 3, 4, 5, 6, 0x10, 0x11, 65, 66] * 100), "binary"),
    (bytes((i * 37 + 11) % 128 + 128 for i in range(3000)), "not text in UTF-8 or any encoding"),
])
def test_bad_bytes_are_refused_with_one_line(data, message):
    with pytest.raises(InputError) as info:
        read_document("-", stdin=io.BytesIO(data))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_document(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="is a directory"):
        read_document(str(tmp_path))


def test_stdin_and_several_files_with_headers(tmp_path):
    (tmp_path / "a.txt").write_text("First file text.\n")
    (tmp_path / "b.md").write_text("# Second\n\nSecond file text.\n")
    doc = read_documents([str(tmp_path / "a.txt"), "-", str(tmp_path / "b.md")],
                         stdin=io.BytesIO(b"From the pipe."))
    assert doc.parts == [str(tmp_path / "a.txt"), "<stdin>", str(tmp_path / "b.md")]
    positions = [doc.text.index(f"=== {name} ===") for name in doc.parts]
    assert positions == sorted(positions)
    for content in ("First file text.", "From the pipe.", "Second file text."):
        assert content in doc.text
    assert doc.text.index("First file") < doc.text.index("From the pipe") < doc.text.index("Second file")


def test_stdin_only_once():
    with pytest.raises(InputError, match="only once"):
        read_documents(["-", "-"], stdin=io.BytesIO(b"x"))


# -- PDFs ----------------------------------------------------------------------

LEFT = ["The left column starts the story of", "a lighthouse keeper named Orla who", "counted ships every night."]
RIGHT = ["The right column continues: one", "winter a ship called Heron never", "came back to the harbour."]


def test_pdf_pages_in_order_with_progress(tmp_path):
    pages = [[[f"Page {i} says hello number {i}.", "A second line on this page."]] for i in range(1, 6)]
    path = tmp_path / "five.pdf"
    path.write_bytes(make_pdf(pages))
    seen = []
    doc = read_document(str(path), progress=lambda done, total: seen.append((done, total)))
    assert doc.pages == 5
    assert seen == [(i, 5) for i in range(1, 6)]
    starts = [doc.text.index(f"Page {i} says hello number {i}.") for i in range(1, 6)]
    assert starts == sorted(starts)
    # Page breaks are kept as blank lines.
    assert doc.text.count("\n\n") == 4


def test_pdf_two_columns_keep_each_column_together(tmp_path):
    path = tmp_path / "columns.pdf"
    path.write_bytes(make_pdf([[LEFT, RIGHT]]))
    text = read_document(str(path)).text
    for line in LEFT + RIGHT:
        assert line in text
    assert text.index(LEFT[-1]) < text.index(RIGHT[0])


def test_pdf_whitespace_and_hyphenation_are_cleaned(tmp_path):
    pages = [[["An   example    of    spacing and a hyphen-", "ated word, then Jean-", "Paul keeps his."]],
             [["The last word of this page is broken by the page break: light-"]],
             [["house keepers count ships."]]]
    path = tmp_path / "messy.pdf"
    path.write_bytes(make_pdf(pages))
    text = read_document(str(path)).text
    assert "An example of spacing and a hyphenated word, then Jean-\nPaul keeps his." in text
    assert "lighthouse keepers" in text
    assert "  " not in text


def test_clean_pdf_text_skips_empty_pages():
    assert clean_pdf_text(["  one \n", "", "two"]) == "one\n\ntwo"


def test_encrypted_pdf_is_refused(tmp_path):
    path = tmp_path / "locked.pdf"
    path.write_bytes(encrypt_pdf(make_pdf([[LEFT]])))
    with pytest.raises(InputError, match="encrypted PDF that needs a password"):
        read_document(str(path))


def test_pdf_encrypted_without_user_password_opens(tmp_path):
    path = tmp_path / "restricted.pdf"
    path.write_bytes(encrypt_pdf(make_pdf([[LEFT]]), user_password=""))
    assert LEFT[0] in read_document(str(path)).text


def test_pdf_without_text_layer(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([[], []]))
    with pytest.raises(InputError, match="no text layer"):
        read_document(str(path))


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.97])
def test_truncated_pdf(tmp_path, cut):
    data = make_pdf([[LEFT], [RIGHT]] * 3)
    path = tmp_path / "cut.pdf"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError, match="truncated"):
        read_document(str(path))


def test_corrupt_pdf(tmp_path):
    path = tmp_path / "bad.pdf"
    path.write_bytes(b"%PDF-1.4\n" + b"this is not a pdf body\n" * 20 + b"%%EOF\n")
    with pytest.raises(InputError, match="corrupt"):
        read_document(str(path))


def test_token_estimate_without_a_model():
    assert estimate_tokens("hello world") == 2
    n = estimate_tokens(FRENCH * 10)
    assert 300 < n < 1000


def test_decode_reports_encoding():
    assert decode_bytes("x", FRENCH.encode("utf-8"))[1] == "utf-8"
