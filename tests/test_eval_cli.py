"""`lminf eval ppl` and `lminf eval passkey` on the tiny model: content on stdout, one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CORPUS
from typer.testing import CliRunner

from lminf_cli.cli.app import app

runner = CliRunner()
TINY = ["--n-local", "32", "--n-global", "4", "--chunk-size", "16"]
TINY_FAST = ["--n-local", "32", "--n-global", "4", "--chunk-size", "128"]


def invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(CORPUS * 12)
    return path


def test_ppl_json_buckets_and_vanilla_stop(tiny_model_dir, text_file):
    r = invoke(["eval", "ppl", text_file, "--model", tiny_model_dir, "--max-length", "300", "--bucket", "32",
                "--baseline", "vanilla", "--baseline-max-length", "200", "--n-local", "64", "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["tokens"] == 300 and rep["bucket"] == 32 and rep["trained_length"] == 64
    lminf, vanilla = rep["methods"]["lminf"], rep["methods"]["vanilla"]
    assert len(lminf["buckets"]) == math.ceil(300 / 32)
    assert sum(b["tokens"] for b in lminf["buckets"]) == 299
    assert lminf["stop_reason"] is None and lminf["tokens_read"] == 300
    # The unmodified model stopped where it was told, and said so on stderr (one line).
    assert vanilla["stopped_at"] == 200 and "200" in vanilla["stop_reason"]
    assert sum(b["tokens"] for b in vanilla["buckets"]) == 199
    assert r.stderr.strip().splitlines() == ["lminf: unmodified stopped at 200 of 300 tokens: "
                                             "reached the baseline length limit of 200 tokens"]
    # With the window at the trained length, both agree on the first L tokens.
    for a, b in zip(lminf["buckets"][:2], vanilla["buckets"][:2], strict=True):
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)


def test_ppl_table_with_sparkline(tiny_model_dir, text_file):
    r = invoke(["eval", "ppl", text_file, "--model", tiny_model_dir, "--max-length", "256", "--bucket", "32",
                "--baseline", "window", *TINY])
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert "LM-Infinite NLL" in out and "window baseline NLL" in out and "224-256" in out
    assert "Past the trained length (64-256)" in out
    spark = [line for line in out.splitlines() if line.strip().startswith("LM-Infinite ")]
    assert len(spark) == 1 and "|" in spark[0] and any(c in spark[0] for c in "▁▂▃▄▅▆▇█")


def test_ppl_window_only_with_stride_matches_core(tiny_model_dir, text_file):
    from lminf_cli.eval import ppl
    from lminf_cli.eval.baseline import DenseModel
    from lminf_cli.models import load_model

    r = invoke(["eval", "ppl", text_file, "--model", tiny_model_dir, "--max-length", "200", "--bucket", "50",
                "--baseline", "window", "--window-stride", "24", "--no-lminf", "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert list(rep["methods"]) == ["window"] and rep["window_stride"] == 24
    lm = load_model(str(tiny_model_dir), "auto", "auto")  # what the CLI picked (CUDA and bf16 on a GPU)
    ids = ppl.tokenize_prefix(lm.tokenizer, text_file.read_text(), 200)
    ref = ppl.bucket_means(DenseModel(lm).window_nll(ids, 64, 24).nll, 50)
    assert [b["nll"] for b in rep["methods"]["window"]["buckets"]] == pytest.approx([b.nll for b in ref], abs=1e-5)


def test_ppl_streams_average_by_position(tiny_model_dir, text_file):
    from lminf_cli.eval import baseline, ppl
    from lminf_cli.generate import Engine
    from lminf_cli.models import load_model
    from lminf_cli.settings import LambdaSettings

    r = invoke(["eval", "ppl", text_file, "--model", tiny_model_dir, "--max-length", "200", "--bucket", "50",
                "--streams", "3", "--baseline", "window", "--window-stride", "24", *TINY, "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["streams"] == 3 and rep["tokens"] == 200
    lm = load_model(str(tiny_model_dir), "auto", "auto")
    ids = ppl.tokenize_prefix(lm.tokenizer, text_file.read_text(), 600)
    engine = Engine(lm, LambdaSettings.for_model(64, n_local=32, n_global=4).replace(chunk_size=16))
    dense = baseline.DenseModel(lm)
    for method, score in (("lminf", engine.token_nll), ("window", lambda p: dense.window_nll(p, 64, 24).nll)):
        # Position p of the report is the mean over the three stretches [200 i, 200 (i + 1)) at p.
        nll = torch.stack([score(ids[200 * i:200 * (i + 1)]) for i in range(3)]).mean(0)
        want = [b.nll for b in ppl.bucket_means(nll, 50)]
        assert [b["nll"] for b in rep["methods"][method]["buckets"]] == pytest.approx(want, abs=1e-5)
    # Each stream's own buckets are in the JSON too; --offset 200 starts at the second stream.
    later = invoke(["eval", "ppl", text_file, "--model", tiny_model_dir, "--max-length", "200", "--bucket", "50",
                    "--streams", "2", "--offset", "200", *TINY, "--json"])
    assert later.exit_code == 0, later.stderr
    rep2 = json.loads(later.stdout)
    assert rep2["offset"] == 200
    per_stream = rep["methods"]["lminf"]["stream_buckets"]
    assert len(per_stream) == 3
    assert torch.allclose(torch.tensor(rep2["methods"]["lminf"]["stream_buckets"]), torch.tensor(per_stream[1:]),
                          atol=1e-5)
    assert [b["nll"] for b in rep["methods"]["window"]["buckets"]] == pytest.approx(
        torch.tensor(rep["methods"]["window"]["stream_buckets"]).mean(0).tolist(), abs=1e-5)
    table = invoke(["eval", "ppl", text_file, "--model", tiny_model_dir, "--max-length", "200", "--bucket", "50",
                    "--streams", "3", *TINY])
    assert table.exit_code == 0 and "mean of 3 streams of 200 tokens" in " ".join(table.stdout.split())


def test_ppl_stdin_and_plot(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "nll.png"
    r = invoke(["eval", "ppl", "-", "--model", tiny_model_dir, "--max-length", "200", "--bucket", "50",
                "--baseline", "vanilla", "--baseline", "window", "--plot", png, *TINY], input=CORPUS * 8)
    assert r.exit_code == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "▁" not in r.stdout  # the chart replaces the sparkline
    assert "unmodified NLL" in r.stdout


def test_passkey_json_and_table(tiny_model_dir):
    args = ["eval", "passkey", "--model", tiny_model_dir, "--lengths", "600,900", "--depths", "0.2,0.8",
            "--seed", "3", "--baseline", "--baseline-max-length", "800", *TINY_FAST]
    r = invoke([*args, "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["lengths"] == [600, 900] and rep["depths"] == [0.2, 0.8] and rep["samples"] == 1
    lminf = [x for x in rep["results"] if x["method"] == "lminf"]
    base = [x for x in rep["results"] if x["method"] == "vanilla"]
    assert len(lminf) == len(base) == 4
    for x in lminf:
        assert abs(x["tokens"] - x["length"]) <= 0.02 * x["length"]
        assert x["skipped"] is None and x["correct"] == (x["predicted"] == x["key"])
    # Same prompts for both methods; the 900-token ones exceed the baseline's limit.
    assert [x["key"] for x in lminf] == [x["key"] for x in base]
    assert all((x["skipped"] is not None) == (x["length"] == 900) for x in base)
    assert rep["accuracy"]["vanilla"]["900"]["0.2"] == {"correct": 0, "total": 0, "skipped": 1, "accuracy": None}
    assert r.stderr.strip().splitlines() == ["lminf: unmodified model skipped 2 of 4 prompts (from 900 tokens): "
                                             "longer than the baseline length limit of 800 tokens"]


def test_passkey_with_the_retrieval_recipe(tiny_model_dir):
    # The recipe reaches the engine (and the report says so): top-k 5, half-L window and cap, L/8 distance.
    r = invoke(["eval", "passkey", "--model", tiny_model_dir, "--lengths", "600", "--depths", "0.5",
                "--retrieval", "--middle-from-layer", "0", "--json", "--quiet"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)["settings"]
    assert (s["n_local"], s["limit_distance"], s["middle_top_k"], s["middle_distance"], s["middle_blocks"]) == \
        (32, 32, 5, 8, 16)


def test_passkey_table_baseline_only(tiny_model_dir):
    r = invoke(["eval", "passkey", "--model", tiny_model_dir, "--lengths", "600", "--depths", "0.5",
                "--baseline", "--no-lminf", *TINY_FAST])
    assert r.exit_code == 0, r.stderr
    assert "Passkey accuracy, unmodified" in r.stdout and "LM-Infinite" not in r.stdout
    assert "depth 0.5" in r.stdout


def test_passkey_plot(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "pk.png"
    r = invoke(["eval", "passkey", "--model", tiny_model_dir, "--lengths", "600", "--depths", "0.5",
                "--plot", png, *TINY_FAST])
    assert r.exit_code == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def _bad_cases(tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("A stitch in time saves nine. " * 10)
    ok = tmp_path / "ok.txt"
    ok.write_text(CORPUS)
    m = ["--model", tiny_model_dir]
    return {
        "missing file": ["ppl", tmp_path / "nope.txt", *m],
        "shorter than a bucket": ["ppl", short, *m, "--bucket", "1k"],
        "max-length does not parse": ["ppl", ok, *m, "--max-length", "lots"],
        "bucket does not parse": ["ppl", ok, *m, "--bucket", "1x"],
        "zero bucket": ["ppl", ok, *m, "--bucket", "0"],
        "unknown baseline": ["ppl", ok, *m, "--baseline", "sliding"],
        "negative baseline time": ["ppl", ok, *m, "--baseline", "vanilla", "--baseline-time", "-5"],
        "baseline length does not parse": ["ppl", ok, *m, "--baseline-max-length", "32q"],
        "ppl bad window": ["ppl", ok, *m, "--n-local", "0"],
        "lengths do not parse": ["passkey", *m, "--lengths", "4k,eight"],
        "empty length in list": ["passkey", *m, "--lengths", "4k,,8k"],
        "depth above 1": ["passkey", *m, "--depths", "0.5,1.5"],
        "negative depth": ["passkey", *m, "--depths=-0.1"],
        "depth not a number": ["passkey", *m, "--depths", "middle"],
        "zero samples": ["passkey", *m, "--samples", "0"],
        "unknown template": ["passkey", *m, "--template", "fancy"],
        "chat template missing": ["passkey", *m, "--lengths", "600", "--template", "chat"],
        "length too short for the prompt": ["passkey", *m, "--lengths", "20"],
        "no-lminf without baseline": ["ppl", ok, *m, "--no-lminf"],
        "window stride too large": ["ppl", ok, *m, "--baseline", "window", "--window-stride", "64"],
        "zero streams": ["ppl", ok, *m, "--streams", "0"],
        "too few tokens for the streams": ["ppl", ok, *m, "--max-length", "200", "--streams", "50"],
        "offset does not parse": ["ppl", ok, *m, "--offset", "ten"],
        "offset past the end": ["ppl", ok, *m, "--offset", "1M"],
    }


BAD_CASES = ["missing file", "shorter than a bucket", "max-length does not parse", "bucket does not parse",
             "zero bucket", "unknown baseline", "negative baseline time", "baseline length does not parse",
             "ppl bad window", "lengths do not parse", "empty length in list", "depth above 1", "negative depth",
             "depth not a number", "zero samples", "unknown template", "chat template missing",
             "length too short for the prompt", "no-lminf without baseline", "window stride too large",
             "zero streams", "too few tokens for the streams", "offset does not parse", "offset past the end"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_exit_2(case, tmp_path, tiny_model_dir):
    assert set(BAD_CASES) == set(_bad_cases(tmp_path, tiny_model_dir))
    r = invoke(["eval", *_bad_cases(tmp_path, tiny_model_dir)[case]])
    assert r.exit_code == 2, (case, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf: error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_short_file_message_names_the_bucket(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A stitch in time saves nine. " * 10)
    r = invoke(["eval", "ppl", short, "--model", tiny_model_dir, "--bucket", "1k"])
    assert "fewer than one --bucket (1,024)" in r.stderr


def test_eval_help_lists_commands():
    r = invoke(["eval", "--help"])
    assert r.exit_code == 0 and "ppl" in r.stdout and "passkey" in r.stdout
    r = invoke(["eval", "ppl", "--help"])
    assert "--baseline" in r.stdout and "--n-local" in r.stdout
