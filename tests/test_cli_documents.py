"""`lminf info / encode / ask / summarize / chat` on a tiny model: outputs, states, pipelines, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pdfs import encrypt_pdf, make_pdf
from typer.testing import CliRunner

from lminf_cli.cli.app import app

runner = CliRunner()
TEXT = ("Orla keeps the lighthouse on Gull Rock. Every night she counts the ships.\n"
        "One winter the ship Heron did not come back.\n") * 6
WINDOW = ["--n-local", "32", "--n-global", "4", "--chunk-size", "16"]
SHORT = ["-n", "12"]


def invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    (d / "doc.txt").write_text(TEXT)
    (d / "empty.txt").write_text("")
    (d / "bin.dat").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    (d / "garbled.txt").write_bytes(bytes((i * 37 + 11) % 128 + 128 for i in range(3000)))
    pdf = make_pdf([[["Orla keeps the lighthouse.", "She counts ships."]], [["The Heron was lost."]]])
    (d / "doc.pdf").write_bytes(pdf)
    (d / "locked.pdf").write_bytes(encrypt_pdf(pdf))
    (d / "scan.pdf").write_bytes(make_pdf([[]]))
    (d / "corrupt.pdf").write_bytes(b"%PDF-1.4\n" + b"garbage\n" * 30 + b"%%EOF\n")
    (d / "cut.pdf").write_bytes(pdf[: len(pdf) // 2])
    return d


@pytest.fixture(scope="module")
def state(files, tiny_model_dir):
    path = files / "doc.lminf"
    r = invoke(["encode", files / "doc.txt", "-o", path, "--model", tiny_model_dir, *WINDOW])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "" and "wrote" in r.stderr
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_model_dir):
    """Same architecture and tokenizer as tiny_model_dir, other weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    path = tmp_path_factory.mktemp("other-llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def bad_cases(files: Path, state: Path) -> dict[str, list]:
    truncated = files / "truncated.lminf"
    truncated.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    return {
        "missing file": [files / "nope.txt", "q"],
        "directory": [files, "q"],
        "empty file": [files / "empty.txt", "q"],
        "binary file": [files / "bin.dat", "q"],
        "undecodable text": [files / "garbled.txt", "q"],
        "encrypted pdf": [files / "locked.pdf", "q"],
        "pdf without text": [files / "scan.pdf", "q"],
        "corrupt pdf": [files / "corrupt.pdf", "q"],
        "truncated pdf": [files / "cut.pdf", "q"],
        "truncated state": [truncated, "q"],
        "missing state": [files / "nope.lminf", "q"],
        "empty question": [files / "doc.txt", "  "],
        "state with other files": [state, files / "doc.txt", "q"],
        "state with other settings": [state, "q", "--n-local", "16"],
        "state with other chunk": [state, "q", "--chunk-size", "8"],
    }


CASES = ["missing file", "directory", "empty file", "binary file", "undecodable text", "encrypted pdf",
         "pdf without text", "corrupt pdf", "truncated pdf", "truncated state", "missing state", "empty question",
         "state with other files", "state with other settings", "state with other chunk"]


def assert_one_error_line(r, *expect: str):
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for e in expect:
        assert e in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES)
def test_ask_bad_input(case, files, state, tiny_model_dir):
    args = bad_cases(files, state)[case]
    assert_one_error_line(invoke(["ask", *args, "--model", tiny_model_dir]))


@pytest.mark.parametrize("command", ["summarize", "chat", "encode", "info"])
@pytest.mark.parametrize("case", ["missing file", "binary file", "encrypted pdf", "truncated state"])
def test_other_commands_bad_input(command, case, files, state, tiny_model_dir):
    target = bad_cases(files, state)[case][0]
    extra = {"encode": ["-o", files / "x.lminf"], "info": []}.get(command, ["--model", tiny_model_dir])
    if command == "encode" and case == "truncated state":
        target = files / "doc.txt"
        extra = ["-o", files / "out.txt"]  # not a .lminf name
    assert_one_error_line(invoke([command, target, *extra]))


def test_state_from_another_model_is_refused(state, other_model_dir):
    r = invoke(["ask", state, "Who keeps the lighthouse?", "--model", other_model_dir])
    assert_one_error_line(r, "another model")


def test_ask_streams_the_answer_and_json(files, tiny_model_dir):
    args = [files / "doc.txt", "Who keeps the lighthouse?", "--model", tiny_model_dir, *WINDOW, *SHORT]
    # The document outgrows the window: the question's passage is re-read by default and nothing is said.
    found = invoke(["ask", *args])
    assert found.exit_code == 0 and found.stderr == ""
    # Without retrieval, stderr has one hint that facts may be missed (--quiet drops it).
    text = invoke(["ask", *args, "--no-retrieval"])
    assert text.exit_code == 0 and text.stderr.startswith("lminf: ") and text.stderr.count("\n") == 1
    assert "longer than the 32-token window" in text.stderr and "retrieves" in text.stderr
    quiet = invoke(["ask", *args, "--quiet", "--no-retrieval"])
    assert quiet.stderr == "" and quiet.stdout == text.stdout
    reread = json.loads(invoke(["ask", *args, "--json"]).stdout)
    assert text.stdout.endswith("\n") and text.stdout.strip()
    js = invoke(["ask", *args, "--json", "--no-retrieval"])
    obj = json.loads(js.stdout)
    assert set(obj) == {"answer", "document_tokens", "prompt_tokens", "answer_tokens", "seconds", "finish_reason",
                        "stats"}
    assert obj["answer"] == text.stdout.strip()
    assert 0 < obj["answer_tokens"] <= 12 and obj["document_tokens"] > 100 and obj["seconds"] > 0
    stats = obj["stats"]
    assert stats["generated_tokens"] == obj["answer_tokens"] + (obj["finish_reason"] == "stop")
    assert stats["prompt_tokens"] > obj["document_tokens"]  # the document, then the question
    # The default re-read writes the passage out again before the question.
    assert reread["prompt_tokens"] > obj["prompt_tokens"] + 16 and reread["answer"] == found.stdout.strip()
    again = json.loads(invoke(["ask", *args, "--json", "--reread", "0"]).stdout)
    assert again["prompt_tokens"] == obj["prompt_tokens"]
    assert 0 < stats["ttft_seconds"] < obj["seconds"] and stats["peak_memory_bytes"] > 0


def test_state_round_trip_through_the_cli(files, state, tiny_model_dir):
    q = ["Who keeps the lighthouse?", *SHORT]
    fresh = invoke(["ask", files / "doc.txt", *q, "--model", tiny_model_dir, *WINDOW])
    # The state fixes its settings: no window options needed.  It never chooses the model:
    # without --model the default one is loaded, the fingerprints differ, and the error
    # names the model to pass.
    refused = invoke(["ask", state, *q])
    assert refused.exit_code == 2 and "another model" in refused.stderr and "--model" in refused.stderr
    saved = invoke(["ask", state, *q, "--model", tiny_model_dir])
    assert saved.exit_code == 0, saved.stderr
    assert saved.stdout == fresh.stdout and fresh.stdout.strip()


def test_retrieval_in_ask_and_through_a_saved_state(files, tiny_model_dir, tmp_path):
    # The document is ~5x the window: with retrieval the answer's rows also read the middle.
    q = ["Who keeps the lighthouse?", *SHORT]
    top = ["--middle-top-k", "3", "--middle-from-layer", "0", "--middle-distance", "8"]
    fresh = invoke(["ask", files / "doc.txt", *q, "--model", tiny_model_dir, *WINDOW, *top])
    assert fresh.exit_code == 0, fresh.stderr
    plain = invoke(["ask", files / "doc.txt", *q, "--model", tiny_model_dir, *WINDOW])
    assert fresh.stdout.strip() and fresh.stdout != plain.stdout
    path = tmp_path / "top.lminf"
    r = invoke(["encode", files / "doc.txt", "-o", path, "--model", tiny_model_dir, *WINDOW, *top])
    assert r.exit_code == 0, r.stderr
    saved = invoke(["ask", path, *q, "--model", tiny_model_dir])  # the state's retrieval settings and stores
    assert saved.exit_code == 0, saved.stderr
    assert saved.stdout == fresh.stdout
    again = invoke(["ask", path, *q, "--middle-top-k", "0", "--model", tiny_model_dir])
    assert again.stdout == saved.stdout  # 0: the state's own


def test_retrieval_recipe_is_its_options(files, tiny_model_dir):
    # --retrieval on a model trained on 64 tokens: top-k 5, window and cap 32, insertion distance 8.
    q = ["Who keeps the lighthouse?", *SHORT, "--model", tiny_model_dir, "--middle-from-layer", "0"]
    recipe = invoke(["ask", files / "doc.txt", *q, "--retrieval"])
    spelled = invoke(["ask", files / "doc.txt", *q, "--middle-top-k", "5", "--n-local", "32",
                      "--limit-distance", "32", "--middle-distance", "8"])
    assert recipe.exit_code == spelled.exit_code == 0, recipe.stderr
    assert recipe.stdout == spelled.stdout and recipe.stdout.strip()


@pytest.mark.parametrize("flag", [["--middle-top-k", "3"], ["--retrieval"]])
def test_retrieval_on_a_state_without_stores_is_refused(state, flag, tiny_model_dir):
    r = invoke(["ask", state, "Who keeps the lighthouse?", *flag, "--model", tiny_model_dir])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("lminf: error: ") and "without retrieval" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_info_on_text_pdf_and_state(files, state):
    r = invoke(["info", files / "doc.txt", files / "doc.pdf", state])
    assert r.exit_code == 0 and r.stderr == ""
    assert "pages: 2" in r.stdout and f"characters: {len(TEXT):,}" in r.stdout
    assert "kind: lminf state" in r.stdout and "n_local=32" in r.stdout
    rows = [json.loads(line) for line in invoke(["info", "--json", files / "doc.txt", state]).stdout.splitlines()]
    assert rows[0]["tokens_estimate"] > 100 and rows[1]["settings"]["n_local"] == 32
    assert rows[1]["document_tokens"] > 100


def test_several_files_and_pdf(files, tiny_model_dir):
    r = invoke(["ask", files / "doc.pdf", files / "doc.txt", "What was lost?", "--model", tiny_model_dir,
                *WINDOW, *SHORT, "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["document_tokens"] > 100


def test_chat_with_scripted_stdin(files, tiny_model_dir, tmp_path):
    transcript, saved = tmp_path / "chat.txt", tmp_path / "chat.lminf"
    script = (f"Who keeps the lighthouse?\n\nWhat was lost?\n/reset\nWho keeps the lighthouse?\n/bogus\n"
              f"/save {transcript}\n/save {saved}\n/quit\nnever asked\n")
    args = ["chat", files / "doc.txt", "--model", tiny_model_dir, *WINDOW, *SHORT, "--json"]
    r = invoke(args, input=script)
    assert r.exit_code == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["question"] for a in answers] == ["Who keeps the lighthouse?", "What was lost?",
                                                "Who keeps the lighthouse?"]
    assert answers[2]["answer"] == answers[0]["answer"]  # /reset: back to the document alone
    assert "unknown command /bogus" in r.stderr
    assert transcript.read_text().count("Q: ") == 3
    # The saved state answers like the session did for the first question.
    again = invoke(["ask", saved, "Who keeps the lighthouse?", *SHORT, "--json", "--model", tiny_model_dir])
    assert json.loads(again.stdout)["answer"] == answers[0]["answer"]


def test_chat_history_zero_equals_ask(files, tiny_model_dir):
    questions = ["Who keeps the lighthouse?", "What was lost?"]
    args = [files / "doc.txt", "--model", tiny_model_dir, *WINDOW, *SHORT]
    r = invoke(["chat", *args, "--history", "0"], input="\n".join(questions) + "\n")
    assert r.exit_code == 0 and r.stderr == ""
    expected = "".join(invoke(["ask", args[0], q, *args[1:]]).stdout for q in questions)
    assert r.stdout == expected


def test_chat_refuses_document_on_stdin(tiny_model_dir):
    assert_one_error_line(invoke(["chat", "-", "--model", tiny_model_dir], input="x"), "stdin")


def test_summarize_long_document_writes_notes(files, tiny_model_dir):
    r = invoke(["summarize", files / "doc.txt", "--model", tiny_model_dir, *WINDOW, "--section-tokens", "150",
                "--note-tokens", "8",
                "--length", "short", "-n", "10", "--json"])
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    assert len(obj["notes"]) >= 2 and 0 < obj["summary_tokens"] <= 10


def test_summarize_state_without_notes_warns(state, tiny_model_dir):
    r = invoke(["summarize", state, "-n", "5", "--model", tiny_model_dir])
    assert r.exit_code == 0
    assert r.stdout.strip() and "covers mainly its end" in r.stderr


def test_summarize_bad_length(files):
    assert_one_error_line(invoke(["summarize", files / "doc.txt", "--length", "huge"]), "--length")


def _default_sigint() -> None:
    # A test run started in the background (`pytest &`) inherits SIGINT ignored; a user's
    # terminal never does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _lminf(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lminf_cli", *map(str, args)], env=env, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint, **kw)


def test_ask_on_stdin_in_a_shell_pipeline(files, tiny_model_dir):
    # --dtype float32: the child process picks its own precision (bfloat16 on a CPU with AMX), while
    # the in-process run below computes in float32 as every test does (conftest).
    cmd = (f"cat {files / 'doc.txt'} | {sys.executable} -m lminf_cli ask - 'Who keeps the lighthouse?' "
           f"--model {tiny_model_dir} {' '.join(WINDOW + SHORT)} --dtype float32 --json --quiet | cat")
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    from_file = invoke(["ask", files / "doc.txt", "Who keeps the lighthouse?", "--model", tiny_model_dir,
                        *WINDOW, *SHORT, "--json"])
    assert json.loads(out.stdout)["answer"] == json.loads(from_file.stdout)["answer"]


def test_ask_closed_stdout_ends_quietly(files, tiny_model_dir):
    p = _lminf("ask", files / "doc.txt", "Tell me everything.", "--model", tiny_model_dir, *WINDOW, "-n", "400", "-q",
               "--temperature", "1", "--seed", "3", stdout=subprocess.PIPE)
    head = p.stdout.read(3)
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    assert len(head) == 3
    assert b"Traceback" not in err and err.strip() == b""
    assert p.returncode in (0, 141)


def test_ctrl_c_while_chat_waits_exits_130(files, tiny_model_dir):
    p = _lminf("chat", files / "doc.txt", "--model", tiny_model_dir, *WINDOW, *SHORT, stdin=subprocess.PIPE,
               stdout=subprocess.PIPE)
    p.stdin.write(b"Who keeps the lighthouse?\n")
    p.stdin.flush()
    first = p.stdout.readline()  # the first answer is out: the session now waits for the next line
    assert first
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert b"Traceback" not in err


def test_encode_with_notes_then_summarize_the_state(files, tiny_model_dir, tmp_path):
    path = tmp_path / "notes.lminf"
    r = invoke(["encode", files / "doc.txt", "-o", path, "--notes", "--section-tokens", "150", "--note-tokens", "6",
                "--model", tiny_model_dir, *WINDOW])
    assert r.exit_code == 0, r.stderr
    notes = json.loads(invoke(["info", "--json", path]).stdout)["notes"]
    assert len(notes) >= 2
    s = invoke(["summarize", path, "-n", "6", "--json", "--model", tiny_model_dir])
    assert s.exit_code == 0 and s.stderr == ""  # no "covers mainly its end" warning: the notes cover it all
    assert json.loads(s.stdout)["notes"] == notes


def test_reread_reaches_ask_and_chat(files, tiny_model_dir):
    args = [files / "doc.txt", "--model", tiny_model_dir, *WINDOW, *SHORT, "--no-retrieval"]
    q = "Which ship did not come back?"
    plain = invoke(["ask", args[0], q, *args[1:], "--reread", "0", "--json"])
    again = invoke(["ask", args[0], q, *args[1:], "--reread", "24", "--json"])
    assert plain.exit_code == again.exit_code == 0
    # The passage about the Heron is read again before the question: a longer prompt.
    assert json.loads(again.stdout)["prompt_tokens"] > json.loads(plain.stdout)["prompt_tokens"] + 15
    chat = invoke(["chat", *args, "--reread", "24", "--quiet", "--history", "0"], input=q + "\n")
    same = invoke(["ask", args[0], q, *args[1:], "--reread", "24", "--quiet"])
    assert chat.stdout == same.stdout
    for bad, words in ((["--reread", "-1"], "--reread"), (["--reread-by", "magic"], "--reread-by")):
        assert_one_error_line(invoke(["ask", args[0], q, *args[1:], *bad]), words)


def test_reread_by_attention_needs_retrieval(files, tiny_model_dir):
    # Refused before anything is encoded: nothing would attend to the middle to follow.
    args = [files / "doc.txt", "Who keeps the lighthouse?", "--model", tiny_model_dir, *WINDOW, *SHORT]
    r = invoke(["ask", *args, "--reread-by", "attention"])
    assert_one_error_line(r, "--retrieval")
    ok = invoke(["ask", *args, "--reread-by", "attention", "--retrieval", "--middle-from-layer", "0"])
    assert ok.exit_code == 0 and ok.stdout.strip()
    # --reread 0 asks for no passage: nothing to follow, nothing refused.
    assert invoke(["ask", *args, "--reread-by", "attention", "--reread", "0"]).exit_code == 0


def test_an_int8_window_state_keeps_its_window_and_refuses_another(files, tiny_model_dir, tmp_path):
    path = tmp_path / "int8.lminf"
    r = invoke(["encode", files / "doc.txt", "-o", path, "--model", tiny_model_dir, *WINDOW, "--kv-quantize", "int8"])
    assert r.exit_code == 0, r.stderr
    r = invoke(["info", path])
    assert r.exit_code == 0 and "kv=int8" in r.stdout, r.stdout
    ask = ["ask", path, "Who keeps the lighthouse?", "--model", tiny_model_dir, *SHORT, "--temperature", "0"]
    r = invoke(ask)
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr
    r = invoke([*ask, "--kv-quantize", "none"])
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "kv_quantize=int8" in lines[0] and "kv_quantize=none" in lines[0], r.stderr
