"""`lminf eval needle`: planting facts in real text, scoring answers, the command on a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS, tiny_tokenizer
from typer.testing import CliRunner

from lminf_cli.cli.app import app
from lminf_cli.errors import InputError, UsageError
from lminf_cli.eval.needle import DEFAULT_NEEDLES, Needle, plant, run_needles, sentence_boundaries, trials

TEXT = (CORPUS + "\n\n") * 30
runner = CliRunner()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_hits_are_any_expected_string_case_insensitive():
    n = Needle("The keeper is Orla Fenwick.", "Who is the keeper?", ("Orla", "Fenwick"))
    assert n.hit("It is orla.") and n.hit("FENWICK") and not n.hit("Nobody")
    with pytest.raises(UsageError):
        Needle("fact", "question?", ())
    with pytest.raises(UsageError):
        Needle(" ", "question?", ("x",))


def test_sentence_boundaries_are_after_sentence_ends():
    text = "One. Two! Three?\n\nFour five. Six"
    assert [text[b:b + 3] for b in sentence_boundaries(text)] == ["Two", "Thr", "Fou", "Six"]


@pytest.mark.parametrize("length,depth", [(1200, 0.1), (1200, 0.5), (2000, 0.9), (600, 0.0)])
def test_a_planted_needle_sits_at_its_depth_on_a_sentence_boundary(tok, length, depth):
    needle = DEFAULT_NEEDLES[0]
    h = plant(tok, TEXT, length, [needle], [depth])
    assert h.text.count(needle.fact) == 1
    at = h.text.index(needle.fact)
    assert at == 0 or h.text[at - 1].isspace() and h.text[:at].rstrip()[-1] in ".!?"
    # Its token position, counted independently, and the document's length in tokens.
    ids = tok.encode(h.text, add_special_tokens=False)
    assert abs(len(ids) - length) <= 2
    before = len(tok.encode(h.text[:at], add_special_tokens=False))
    assert abs(before - h.positions[0]) <= 1
    assert abs(h.depths_actual[0] - depth) < 0.05  # the nearest sentence boundary: sentences are ~30 tokens


def test_several_needles_keep_their_order_and_answers_must_be_absent(tok):
    needles = list(DEFAULT_NEEDLES[:3])
    h = plant(tok, TEXT, 600, needles, [0.8, 0.2, 0.5])
    where = [h.text.index(n.fact) for n in needles]
    assert where[1] < where[2] < where[0]
    assert h.positions[1] < h.positions[2] < h.positions[0]
    with pytest.raises(InputError, match="already contains"):
        plant(tok, "The vault code is 7294. " + TEXT, 1000, [DEFAULT_NEEDLES[0]], [0.5])
    with pytest.raises(InputError, match="tokens"):
        plant(tok, "Too short. Really.", 500, [DEFAULT_NEEDLES[0]], [0.5])


def test_trials_rotate_needles_over_depths_or_spread_several():
    one = trials([100, 200], [0.1, 0.5, 0.9], DEFAULT_NEEDLES[:2], 1)
    assert [(n, [x.fact for x in ns], d) for n, _, ns, d in one][:3] == [
        (100, [DEFAULT_NEEDLES[0].fact], [0.1]), (100, [DEFAULT_NEEDLES[1].fact], [0.5]),
        (100, [DEFAULT_NEEDLES[0].fact], [0.9])]
    many = trials([100], [0.5], DEFAULT_NEEDLES, 3)
    assert many == [(100, 0, list(DEFAULT_NEEDLES[:3]), [0.167, 0.5, 0.833])]
    with pytest.raises(UsageError):
        trials([100], [0.5], DEFAULT_NEEDLES[:2], 3)


def test_scoring_follows_the_answers(tok):
    plan = trials([300], [0.3, 0.7], DEFAULT_NEEDLES, 1)

    def oracle(h):  # sees the planted text, answers from it
        return [next(e for e in n.expect) if n.fact in h.text else "no idea" for n in h.needles]

    right = run_needles("lminf", tok, TEXT, plan, oracle)
    wrong = run_needles("lminf", tok, TEXT, plan, lambda h: ["no idea"] * len(h.needles))
    assert [r.hit for r in right] == [True, True] and [r.hit for r in wrong] == [False, False]
    assert {r.depth for r in right} == {0.3, 0.7} and all(r.tokens > 290 for r in right)


def test_eval_needle_on_a_tiny_model(tiny_model_dir, tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text(TEXT)
    r = runner.invoke(app, ["eval", "needle", str(hay), "--model", str(tiny_model_dir), "--lengths", "200,300",
                            "--depths", "0.2,0.8", "--baseline", "--lambda-alone", "-n", "4", "--n-local", "32",
                            "--middle-top-k", "2", "--middle-from-layer", "0", "--json", "--quiet"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert {x["method"] for x in data["results"]} == {"lminf", "lambda", "vanilla"}
    assert len(data["results"]) == 3 * 2 * 2
    assert data["settings"]["middle_top_k"] == 2 and set(data["accuracy"]) == {"lminf", "lambda", "vanilla"}
    table = runner.invoke(app, ["eval", "needle", str(hay), "--model", str(tiny_model_dir), "--lengths", "200",
                                "--depths", "0.5", "--needles", "2", "-n", "4", "--quiet"])
    assert table.exit_code == 0 and "2 facts per document" in table.stdout and "depth" not in table.stdout


@pytest.mark.parametrize("args,words", [
    (["--needles", "0"], "--needles"),
    (["--needle", "A fact."], "go together"),
    (["--depths", "1.5"], "--depths"),
    (["--lengths", "0"], "--lengths"),
    (["-n", "0"], "--max-new-tokens"),
])
def test_eval_needle_bad_values(tiny_model_dir, tmp_path, args, words):
    hay = tmp_path / "hay.txt"
    hay.write_text(TEXT)
    r = runner.invoke(app, ["eval", "needle", str(hay), "--model", str(tiny_model_dir), *args])
    assert r.exit_code == 2 and r.stdout == "" and words in r.stderr and len(r.stderr.splitlines()) == 1
