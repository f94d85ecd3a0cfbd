"""The `lminf` CLI: stdout carries only content, errors are one stderr line + exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lminf_cli.cli.app import app

runner = CliRunner()
TEXT = "It was the best of times, it was the worst of times. " * 30


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT)
    return path


def invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def test_continue_file_puts_only_text_on_stdout(tiny_model_dir, doc):
    r = invoke(["continue", doc, "--model", tiny_model_dir, "-n", "12", "--n-local", "32", "--n-global", "4"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.strip() != "" and r.stdout.endswith("\n")


def test_continue_stdin_matches_file(tiny_model_dir, doc):
    args = ["--model", tiny_model_dir, "-n", "10", "--n-local", "32", "--chunk-size", "16", "--temperature", "0"]
    from_file = invoke(["continue", doc, *args])
    from_stdin = invoke(["continue", "-", *args], input=TEXT)
    assert from_stdin.exit_code == 0 and from_stdin.stderr == ""
    assert from_stdin.stdout == from_file.stdout  # greedy: identical


def test_sampling_is_reproducible_with_seed(tiny_model_dir, doc):
    args = ["continue", doc, "--model", tiny_model_dir, "-n", "15", "--temperature", "1.0", "--seed", "4"]
    assert invoke(args).stdout == invoke(args).stdout


def _bad(tmp_path: Path) -> dict[str, list]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    # High bytes in no pattern any encoding would produce (legacy encodings are detected).
    (tmp_path / "garbled.txt").write_bytes(bytes((i * 37 + 11) % 128 + 128 for i in range(3000)))
    ok = tmp_path / "ok.txt"
    ok.write_text("hello there")
    return {
        "missing": [tmp_path / "nope.txt"],
        "directory": [tmp_path],
        "empty": [tmp_path / "empty.txt"],
        "blank": [tmp_path / "blank.txt"],
        "binary": [tmp_path / "bin.dat"],
        "undecodable": [tmp_path / "garbled.txt"],
        "unknown model dir": [ok, "--model", tmp_path / "no-such-model"],
        "unknown hub id": [ok, "--model", "nobody/no-such-model-xyz"],
        "zero window": [ok, "--n-local", "0"],
        "negative window": [ok, "--n-local", "-3"],
        "zero chunk": [ok, "--chunk-size", "0"],
        "negative global": [ok, "--n-global", "-1"],
        "bad temperature": [ok, "--temperature", "-1"],
        "bad top-p": [ok, "--top-p", "1.5"],
        "not a number": [ok, "--n-local", "lots"],
        "unknown option": [ok, "--frobnicate"],
        "no store directory": [ok, "--retrieval", "--middle-dir", tmp_path / "no-such-dir"],
        "bad store precision": [ok, "--retrieval", "--middle-dtype", "int3"],
        "negative blocks": [ok, "--retrieval", "--middle-blocks", "-2"],
        "bad quantization": [ok, "--quantize", "int3"],
        "bad KV quantization": [ok, "--kv-quantize", "int3"],
        "bad dtype": [ok, "--dtype", "float8"],
    }


@pytest.mark.parametrize("case", list(_bad(Path("/tmp")).keys()))
def test_bad_input_one_line_exit_2(case, tmp_path):
    r = invoke(["continue", *_bad(tmp_path)[case]])
    assert r.exit_code == 2, (case, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf: error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_model_message_says_no_download(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("hello")
    r = invoke(["continue", ok, "--model", "nobody/no-such-model-xyz"])
    assert "never downloads" in r.stderr


def _lminf(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lminf_cli", *args], env=env, stderr=subprocess.PIPE, **kw)


def test_closed_stdout_ends_quietly(tiny_model_dir, doc):
    p = _lminf("continue", str(doc), "--model", str(tiny_model_dir), "-n", "300", "--temperature", "1",
               "--seed", "1", "--n-local", "32", stdout=subprocess.PIPE)
    head = p.stdout.read(5)  # like `| head -c 5`
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert len(head) == 5
    assert b"Traceback" not in err and err.strip() == b""
    assert p.returncode in (0, 141)


def test_ctrl_c_during_encode_exits_130(tiny_model_dir, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(TEXT * 400)  # slow to encode one token at a time
    p = _lminf("continue", str(big), "--model", str(tiny_model_dir), "--chunk-size", "1", "--n-local", "32",
               stdout=subprocess.PIPE)
    time.sleep(8)  # past start-up, inside the encode loop
    assert p.poll() is None, "encode finished before the interrupt"
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # seen once on a loaded machine: a second Ctrl-C must end it
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert b"Traceback" not in err
    assert out == b""


def test_version_and_help():
    assert invoke(["--version"]).stdout.startswith("lminf ")
    r = invoke(["continue", "--help"])
    assert r.exit_code == 0 and "--n-local" in r.stdout and "--limit-distance" in r.stdout
