"""What users of llm, llama-cli, ollama and mlx_lm expect of the CLI (issue #19), on tiny models.

Outputs are compared with the Python API run on the same model and settings, so an
option is checked to reach what it sets, not only to be accepted.  stdout and stderr
are checked separately.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lminf_cli.cli.app import app
from lminf_cli.documents import Document
from lminf_cli.models import load_model
from lminf_cli.sampling import ANSWER_DEFAULTS, CONTINUE_DEFAULTS, SamplingParams
from lminf_cli.tasks import ask, encode_document, engine_for

runner = CliRunner()
TEXT = "It was the best of times, it was the worst of times. " * 8
WINDOW = ["--n-local", "32", "--n-global", "4", "--chunk-size", "16"]
REQUESTED = {"n_local": 32, "n_global": 4, "chunk_size": 16}


def invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "doc.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def api_continue(lm, params: SamplingParams, n: int = 16) -> str:
    engine = engine_for(lm, REQUESTED)
    state = engine.encode(lm.tokenizer.encode(TEXT, add_special_tokens=False))
    return engine.generate(state, n, params)


def cli_continue(tiny_model_dir, doc, *extra, n: int = 16):
    r = invoke(["continue", doc, "--model", tiny_model_dir, "-n", str(n), *WINDOW, *extra])
    assert r.exit_code == 0, r.stderr
    return r


# -- sampling options --------------------------------------------------------------

@pytest.mark.parametrize("flags,params", [
    (["--temperature", "0"], SamplingParams()),
    (["--temp", "0", "--repeat-penalty", "1.5", "--repeat-last-n", "8"], SamplingParams(repeat_penalty=1.5,
                                                                                        repeat_last_n=8)),
    (["--temp", "0.8", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.05", "--seed", "5"],
     SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=5)),
    (["--seed", "7"], CONTINUE_DEFAULTS.replace(seed=7)),  # continue samples by default
], ids=["greedy", "greedy-penalty", "sampled", "defaults"])
def test_sampling_options_reach_the_sampler(flags, params, tiny_model_dir, doc, lm):
    r = cli_continue(tiny_model_dir, doc, *flags)
    assert r.stderr == ""
    assert r.stdout == api_continue(lm, params) + "\n"


def test_temp_is_temperature(tiny_model_dir, doc):
    a = cli_continue(tiny_model_dir, doc, "--temp", "1.3", "--seed", "2").stdout
    assert a == cli_continue(tiny_model_dir, doc, "--temperature", "1.3", "--seed", "2").stdout


def test_model_generation_config_gives_the_defaults(tiny_model_dir, doc, tmp_path, lm):
    # As generate() reads it: without do_sample, greedy; its repetition penalty applies.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": False,
                                                              "repetition_penalty": 1.3}))
    r = cli_continue(model, doc)
    assert r.stdout == api_continue(lm, SamplingParams(repeat_penalty=1.3)) + "\n"
    # --temperature 0 given: greedy, and the model's penalty (a default) is dropped.
    assert cli_continue(model, doc, "--temperature", "0").stdout == api_continue(lm, SamplingParams()) + "\n"


def test_stop_sequence_ends_the_output(tiny_model_dir, doc):
    full = cli_continue(tiny_model_dir, doc, "--temperature", "0", n=40).stdout
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = cli_continue(tiny_model_dir, doc, "--temperature", "0", "--stop", stop, "--stop", "\u2603", n=40).stdout
    assert cut == full[:full.index(stop)] + ("\n" if full.index(stop) else "")


BAD = [
    (["--repeat-penalty", "0"], "--repeat-penalty must be > 0"),
    (["--min-p", "2"], "--min-p must be in [0, 1]"),
    (["--repeat-last-n", "-1"], "--repeat-last-n must be in [0, 4096]"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--temp", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--stop", ""], "--stop must not be empty"),
    (["-n", "0"], "--max-new-tokens must be positive"),
]


@pytest.mark.parametrize("command", ["continue", "ask", "chat", "summarize"])
@pytest.mark.parametrize("flags,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_values_are_one_line_exit_2(command, flags, message, tiny_model_dir, doc):
    question = ["q"] if command == "ask" else []
    r = invoke([command, doc, *question, "--model", tiny_model_dir, *flags])
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"lminf: error: {message}"), r.stderr


# -- help, usage -----------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["eval"]], ids=["lminf", "lminf eval"])
def test_bare_group_prints_its_help(args):
    r = invoke(args)
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout.lstrip().startswith("Usage: ") and "Commands" in r.stdout  # (CliRunner calls it "root")
    assert r.stdout == invoke([*args, "--help"]).stdout


COMMANDS = ["continue", "corpus", "info", "encode", "ask", "summarize", "chat", "bench", "eval ppl", "eval passkey"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_plainly(command):
    r = invoke([*command.split(), "-h"])
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout == invoke([*command.split(), "--help"]).stdout
    for odd in ("<int>", "<str>", "<float>", "<bool>", "list[", "{FILE", "<list"):
        assert odd not in r.stdout, (odd, r.stdout)
    assert "[default:" not in r.stdout or "\\[default" not in r.stdout


def test_help_panels_put_everyday_options_first():
    out = invoke(["ask", "--help"]).stdout
    order = [out.index(title) for title in ("Options", "Sampling", "Model placement", "Λ-attention", "Retrieval")]
    assert order == sorted(order)
    assert out.index("--system") < out.index("Sampling") < out.index("--repeat-penalty") < out.index("--retrieval")
    assert "ask [OPTIONS] FILE... QUESTION" in out


def test_question_starting_with_a_dash(tiny_model_dir, doc):
    r = invoke(["ask", doc, "-what is this?", "--model", tiny_model_dir])
    assert r.exit_code == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "goes after --" in r.stderr
    ok = invoke(["ask", doc, "--model", tiny_model_dir, *WINDOW, "-n", "4", "--", "-what is this?"])
    assert ok.exit_code == 0 and ok.stdout.strip(), ok.stderr


# -- system prompt ---------------------------------------------------------------------

def test_system_prompt_reaches_the_document_prefix(tiny_model_dir, doc, lm, tmp_path):
    q = "Who had the best of times?"
    base = ["--model", tiny_model_dir, *WINDOW, "-n", "10", "--json", "-q"]
    r = invoke(["ask", doc, q, "-s", "Answer like a pirate.", *base])
    assert r.exit_code == 0, r.stderr
    engine = engine_for(lm, REQUESTED)
    encoded = encode_document(engine, Document("doc.txt", TEXT), "tiny", system="Answer like a pirate.")
    got = json.loads(r.stdout)
    assert got["answer"] == ask(engine, encoded, q, 10, ANSWER_DEFAULTS).text()  # greedy, with the mild penalty
    assert got["stats"]["prompt_tokens"] > got["document_tokens"]
    greedy = invoke(["ask", doc, q, "-s", "Answer like a pirate.", "--temperature", "0", *base])
    assert json.loads(greedy.stdout)["answer"] == ask(engine, encoded, q, 10, SamplingParams()).text()  # exact
    state = tmp_path / "s.lminf"
    assert invoke(["encode", doc, "-o", state, "--system", "Answer like a pirate.", "--model", tiny_model_dir,
                   *WINDOW]).exit_code == 0
    again = invoke(["ask", state, q, "-s", "Answer like a pirate.", *base])
    assert json.loads(again.stdout)["answer"] == got["answer"]
    missing = invoke(["ask", state, q, *base])
    assert missing.exit_code == 2 and missing.stdout == ""
    assert "--system" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


# -- stats -------------------------------------------------------------------------------

STAT_LINES = ("lminf: model load:", "lminf: prompt:", "lminf: first token:", "lminf: generated:",
              "lminf: peak memory:")


def test_verbose_prints_stats_on_stderr_only(tiny_model_dir, doc):
    args = ["ask", doc, "Who?", "--model", tiny_model_dir, *WINDOW, "-n", "8", "-q"]
    plain, verbose = invoke(args), invoke([*args, "--verbose"])
    assert verbose.exit_code == 0 and verbose.stdout == plain.stdout
    lines = verbose.stderr.strip().splitlines()
    assert [line.split(":")[1] for line in lines] == [s.split(":")[1] for s in STAT_LINES]
    assert "tok/s" in lines[1] and "tok/s" in lines[3]
    c = cli_continue(tiny_model_dir, doc, "-v", "--json", "--seed", "1")
    obj = json.loads(c.stdout)
    assert set(obj) == {"text", "finish_reason", "stats"} and obj["finish_reason"] == "length"
    s = obj["stats"]
    assert s["generated_tokens"] == 16 and s["prompt_tokens"] > 0
    assert s["prompt_tps"] > 0 and s["generation_tps"] > 0 and s["ttft_seconds"] > 0 and s["load_seconds"] > 0
    assert [line.split(":")[1] for line in c.stderr.strip().splitlines()] == [x.split(":")[1] for x in STAT_LINES]


# -- chat at a terminal: Ctrl-C, Ctrl-D, history ----------------------------------------

def _spawn_chat(args, env):
    """The CLI's chat on a pseudo-terminal (its controlling terminal: ^C is SIGINT, as for a user)."""
    import os
    import pty
    import sys

    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is stdin, stdout, stderr and the controlling terminal
        os.execve(sys.executable, [sys.executable, "-m", "lminf_cli", "chat", *map(str, args)], env)
    return pid, fd


def _expect(fd, needle: bytes, seen: bytearray, timeout: float = 120.0) -> bytes:
    """Read the terminal until `needle` appears after what was seen before; return the new output."""
    import os
    import select
    import time

    start, deadline = len(seen), time.monotonic() + timeout
    while needle not in seen[start:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not seen; got {bytes(seen[start:])[-800:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child exited
                chunk = b""
            if not chunk:
                raise AssertionError(f"{needle!r} not seen before the end; got {bytes(seen[start:])[-800:]!r}")
            seen += chunk
    return bytes(seen[start:])


def _wait(pid: int, timeout: float = 60.0) -> int:
    import os
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("chat did not exit")


def _press_ctrl_c(fd, pid: int) -> None:
    """Ctrl-C as a person presses it: once the chat waits for the keyboard (blocked reading it).

    Why wait: readline shows the prompt (or echoes a key) and only then blocks in select(); a
    SIGINT that lands in between is noted by Python but wakes nothing, so the chat would wait
    for the next key.  On a loaded 2-core CI machine the test, which presses ^C the instant the
    prompt appears, hit that gap (people do not type within microseconds; a second ^C leaves).
    """
    import os
    import time

    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                where = f.read()
        except OSError:  # no /proc here: a pause long enough for the child to reach select()
            time.sleep(1.0)
            break
        if "poll" in where or "select" in where:
            break
        time.sleep(0.02)
    os.write(fd, b"\x03")


def _env(tmp_path):
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "xterm",
            "COLUMNS": "200"}


@pytest.fixture(scope="module")
def endless_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model without an end token: its sampled answers end only at the budget (or Ctrl-C)."""
    path = tmp_path_factory.mktemp("endless")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    for name, key in (("tokenizer_config.json", "eos_token"), ("generation_config.json", "eos_token_id"),
                      ("config.json", "eos_token_id")):
        cfg = json.loads((path / name).read_text())
        cfg[key] = None
        (path / name).write_text(json.dumps(cfg))
    return path


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(endless_model_dir, doc, tmp_path):
    import os

    from safetensors import safe_open

    encoded = tmp_path / "encoded.lminf"
    assert invoke(["encode", doc, "-o", encoded, "--model", endless_model_dir, *WINDOW]).exit_code == 0
    # A sampled answer that would run for hours: only Ctrl-C ends it.
    # The child process runs float32 as the suite does (--dtype auto may pick bfloat16 on this CPU).
    pid, fd = _spawn_chat([doc, "--model", endless_model_dir, *WINDOW, "-n", "1000000", "--temperature", "1.5",
                           "--seed", "1", "--dtype", "float32"], _env(tmp_path))
    seen = bytearray()
    _expect(fd, b"> ", seen)
    os.write(fd, b"Tell me everything about the times.\r")
    _expect(fd, b"times.", seen)           # the question's echo
    _expect(fd, b"Answering", seen)        # the spinner: the answer is being generated
    os.write(fd, b"\x03")                  # Ctrl-C, delivered by the terminal as SIGINT
    after = _expect(fd, b"> ", seen)       # back at the prompt: the chat goes on
    assert b"answer stopped" in after and b"Traceback" not in after
    saved = tmp_path / "after.lminf"
    os.write(fd, f"/save {saved}\r".encode())
    assert b"wrote" in _expect(fd, b"> ", seen)
    os.write(fd, b"half a question")
    _expect(fd, b"question", seen)
    _press_ctrl_c(fd, pid)                 # Ctrl-C with something typed: the line is dropped
    _expect(fd, b"> ", seen)
    os.write(fd, b"\x04")                  # Ctrl-D at an empty prompt: the chat ends
    assert _wait(pid) == 0
    os.close(fd)
    # The document's state after the interrupted answer is the encoded document, bit for bit.
    with safe_open(str(encoded), "pt") as a, safe_open(str(saved), "pt") as b:
        names = set(a.keys())
        assert names == set(b.keys())
        assert all(a.get_tensor(k).equal(b.get_tensor(k)) for k in names)
    history = (tmp_path / "data" / "lminf" / "chat_history").read_text()
    assert "Tell me everything about the times." in history and "half a question" not in history


def test_ctrl_c_at_an_empty_prompt_leaves(tiny_model_dir, doc, tmp_path):
    import os

    pid, fd = _spawn_chat([doc, "--model", tiny_model_dir, *WINDOW, "-n", "4"], _env(tmp_path))
    seen = bytearray()
    _expect(fd, b"> ", seen)
    _press_ctrl_c(fd, pid)
    assert _wait(pid) == 130
    os.close(fd)
