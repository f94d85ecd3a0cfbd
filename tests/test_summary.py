"""Summaries that cover the whole document: the fallback, the length, the coverage scorer."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS
from typer.testing import CliRunner

from lminf_cli.cli.app import app
from lminf_cli.documents import Document
from lminf_cli.errors import UsageError
from lminf_cli.eval.summary import evaluate_summary, join_parts, key_terms, mentioned, parse_terms
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.prompts import SUMMARY_LENGTHS
from lminf_cli.settings import LambdaSettings
from lminf_cli.tasks import encode_document, notes_as_text, says_nothing, summarize

PARTS = [
    "Macbeth met the witches on the heath. Then Macbeth went home to Inverness, where Banquo waited. "
    "The king Duncan slept. Later, Banquo spoke with Macbeth about the witches.",
    "Ruth went with Naomi to Bethlehem. There Ruth gleaned in the field of Boaz. Naomi told Ruth to wait; "
    "then Boaz married Ruth.",
    "the program must follow the standards. Programs written for POSIX systems use getopt. A POSIX program "
    "reads options with getopt, and every program documents them.",
]
runner = CliRunner()


def test_key_terms_are_each_parts_own_names():
    terms = key_terms(PARTS)
    # Naomi is written mid-sentence only once: one capital could be any word's.
    assert terms[0][:2] == ["macbeth", "banquo"] and terms[1] == ["ruth", "boaz"]
    assert terms[2] == ["posix"]  # "Programs"/"A" start sentences; "program" is mostly lower case
    assert all("then" not in t and "the" not in t for t in terms)


def test_mentioned_matches_whole_words_case_insensitively():
    assert mentioned(["ruth", "boaz", "naomi"], "RUTH and Boaz's field; naomis") == ["ruth", "boaz"]
    assert parse_terms(["a, b", "c"], 2) == [["a", "b"], ["c"]] and parse_terms(None, 2) is None
    with pytest.raises(UsageError):
        parse_terms(["a"], 2)
    with pytest.raises(UsageError):
        parse_terms(["a", " , "], 2)


def test_parts_are_joined_as_cat_would():
    doc = join_parts([Document("a.txt", "One.\n"), Document("b.txt", "\nTwo.")])
    assert doc.text == "One.\n\nTwo." and doc.name == "a.txt + b.txt"


class Fake:
    """A summary as tasks.summarize returns it, with a fixed text."""

    def __init__(self, text):
        self._text, self.timings, self.source_notes, self.fallback_parts = text, {"encode": 1.0}, ["n"], []

    def text(self):
        return self._text


def test_coverage_and_oracle_on_fixed_summaries():
    parts = [Document(f"p{i}", t) for i, t in enumerate(PARTS)]
    said = {"whole": "Macbeth meets witches; Boaz marries.", "p0": "Banquo waits.", "p1": "Nothing here.",
            "p2": "POSIX getopt."}
    report = evaluate_summary(parts, lambda d: Fake(said["whole" if "+" in d.name else d.name]), len,
                              meta={"model": "m"})
    assert [p.covered for p in report.parts] == [True, True, False]
    assert report.coverage == pytest.approx(2 / 3) and report.oracle_coverage == pytest.approx(2 / 3)
    assert report.parts[0].in_summary == ["macbeth"] and report.parts[1].in_oracle == []
    assert report.parts[1].in_summary == ["boaz"]
    data = report.to_json()
    assert data["coverage"] == report.coverage and data["parts"][2]["covered"] is False
    with pytest.raises(UsageError):
        evaluate_summary(parts[:1], lambda d: Fake(""), len)


@pytest.mark.parametrize("text,meta", [
    ("The document has ended.", True), ("This document has ended, and it was long.", True),
    ("It is over.", True), ("", True), ("I cannot summarize this document because it is long.", True),
    ("Macbeth meets three witches, who tell him he will be king; he kills Duncan.", False),
    ("The document follows Ruth and Naomi from Moab to Bethlehem, where Ruth marries Boaz.", False),
])
def test_says_nothing(text, meta):
    assert says_nothing(text) == meta
    if meta and len(text.split()) < 8 and "ended" not in text and "over" not in text:
        assert not says_nothing(text, cut=True)  # short because the budget cut it: as asked


def test_notes_stand_in_as_text():
    assert notes_as_text(["In this passage, the witches meet.", "In this passage, Duncan dies.", "In this passage,"]) \
        == "The witches meet.\n\nDuncan dies."


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    return Engine(lm, LambdaSettings(n_global=4, n_local=32, limit_distance=64, chunk_size=16))


def test_a_summary_that_says_nothing_falls_back_to_the_notes(engine, monkeypatch):
    import lminf_cli.generate as gen

    text = "\n".join(CORPUS.split(". "))
    encoded = encode_document(engine, Document("doc.txt", text), "tiny", notes=True, section_tokens=60,
                              note_tokens=5)
    real = gen.Engine.stream_generate

    def meta_reply(self, state, max_new_tokens, sampling=None, stop_ids=None):
        ids = self.lm.tokenizer.encode("The document has ended.", add_special_tokens=False)
        return real(self, state, len(ids), sampling, stop_ids=[]) if False else _scripted(ids)

    def _scripted(ids):
        for i, t in enumerate(ids):
            yield gen.GenerationResponse(engine.lm.tokenizer.decode([t]), t, i + 1, 1.0, 0)
        yield gen.GenerationResponse("", None, len(ids), 1.0, 0, "stop")

    summary_plain = summarize(engine, encoded, "short", 8)
    assert not summary_plain.fallback or summary_plain.text() != ""  # a part fell back: to its notes
    monkeypatch.setattr(gen.Engine, "stream_generate", meta_reply)
    summary = summarize(engine, encoded, "short", 8)
    # Every part said nothing: each gives way to its run's richest note, in order, within the budget.
    from lminf_cli.tasks import SUMMARY_PARTS, richest_note, summary_parts

    runs = summary_parts(summary.notes, max(1, min(SUMMARY_PARTS["short"][0], 8 // 48)))  # -n 8: one part
    assert summary.text() == " ".join(filter(None, (richest_note(r) for r in runs))).strip()
    assert summary.fallback and summary.fallback_parts == list(range(1, len(runs) + 1))
    assert set(summary.timings) == {"encode", "notes", "condense", "summary"}


def test_length_reaches_the_prompt_and_the_budget(engine, monkeypatch):
    import lminf_cli.tasks as tasks
    from lminf_cli.tasks import SUMMARY_PARTS

    text = "\n".join(CORPUS.split(". "))
    encoded = encode_document(engine, Document("doc.txt", text * 3), "tiny", notes=True, section_tokens=24,
                              note_tokens=4)
    assert len(encoded.notes) >= 8  # enough for the longest summary's parts
    asked = []
    def capture(e, st, prompt, budget, sampling, control=None):
        asked.append((engine.lm.tokenizer.decode(prompt), budget))
        yield from ()

    monkeypatch.setattr(tasks, "_reply_stream", capture)
    for length, (_, budget) in SUMMARY_LENGTHS.items():
        asked.clear()
        summarize(engine, encoded, length).text()
        parts = SUMMARY_PARTS[length][0]
        requests = [(p, b) for p, b in asked if "Notes on part" in p]  # not the condensing merges
        # One request per part, in order, each with its share of the budget.
        assert [f"part {k} of {parts} of the document" in p for k, (p, _) in enumerate(requests, 1)] == [True] * parts
        assert all(b == budget // parts for _, b in requests) and sum(b for _, b in requests) <= budget
    # A small -n: fewer parts, never more tokens than asked.
    asked.clear()
    summarize(engine, encoded, "long", 100).text()
    requests = [b for p, b in asked if "Notes on part" in p]
    assert requests == [50, 50]
    # A document that fits the window: one request, with the --length wording.
    short = encode_document(engine, Document("doc.txt", "Ruth went to Bethlehem."), "tiny")
    for length, (wording, budget) in SUMMARY_LENGTHS.items():
        asked.clear()
        summarize(engine, short, length).text()
        assert len(asked) == 1 and wording in asked[0][0] and asked[0][1] == budget


def test_summary_parts_split_notes_evenly_in_order():
    from lminf_cli.tasks import summary_parts

    notes = [f"n{i}" for i in range(12)]
    assert summary_parts(notes, 5) == [["n0", "n1"], ["n2", "n3", "n4"], ["n5", "n6"], ["n7", "n8", "n9"],
                                       ["n10", "n11"]]
    assert summary_parts(notes[:3], 5) == [["n0"], ["n1"], ["n2"]]
    assert [n for run in summary_parts(notes, 8) for n in run] == notes


def test_eval_summary_on_a_tiny_model(tiny_model_dir, tmp_path):
    files = []
    for i, t in enumerate(PARTS):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(t)
    r = runner.invoke(app, ["eval", "summary", *map(str, files), "--model", str(tiny_model_dir), "--length",
                            "short", "--n-local", "64", "--section-tokens", "48", "--note-tokens", "4", "-n", "6",
                            "--json", "--quiet"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["parts"]) == 3 and data["parts"][0]["terms"][0] == "macbeth"
    assert 0 <= data["coverage"] <= 1 and data["oracle_coverage"] is not None and data["summary"]
    bad = runner.invoke(app, ["eval", "summary", str(files[0]), "--model", str(tiny_model_dir)])
    assert bad.exit_code == 2 and "at least two parts" in bad.stderr


def test_names_in_finds_proper_names_not_titles_or_sentence_openers():
    from lminf_cli.tasks import names_in

    text = ("In this passage, Ruth tells Naomi that Boaz's field is near Bethlehem. The Ghost speaks; "
            "the ghost is the King of Norway. Egeus' daughter waits.\n- Macbeth sleeps.")
    assert names_in(text) == {"ruth", "naomi", "boaz", "bethlehem", "norway"}  # not the, ghost, king, egeus, macbeth
    assert names_in("") == set() and names_in("all lower case here.") == set()


def test_a_part_that_names_nobody_gives_way_to_its_richest_note(monkeypatch):
    import lminf_cli.tasks as tasks
    from lminf_cli.generate import GenerationResponse
    from lminf_cli.tasks import ReplyControl, names_nobody, richest_note

    runs = [["In this passage, Iago tells Roderigo about the Moor. Then they leave.", "In this passage, a storm."],
            ["In this passage, Prospero and Miranda watch the sea. Miranda weeps. The ship sinks."]]
    replies = iter(["The story unfolds between two men, a senator and his wife, in a city at night.",
                    "Prospero shows Miranda the storm he raised, and she pities the ship."])

    def scripted(engine, state, prompt, budget, sampling, control=None):
        text = next(replies)
        yield GenerationResponse(text, 1, 1, 1.0, 0)
        yield GenerationResponse("", None, 1, 1.0, 0, "stop")

    monkeypatch.setattr(tasks, "_reply_stream", scripted)
    fell_back: list[int] = []
    out = "".join(r.text for r in tasks._parts_stream(None, None, [[1], [2]], runs, 40, 1, None, ReplyControl(),
                                                      fell_back))
    assert names_nobody("The story unfolds between two men.", runs[0]) and not names_nobody("Iago waits.", runs[0])
    assert richest_note(runs[0]) == "Iago tells Roderigo about the Moor. Then they leave."
    assert out == richest_note(runs[0]) + " Prospero shows Miranda the storm he raised, and she pities the ship."
    assert fell_back == [1]
    # Notes that name nobody ask nothing of the reply.
    assert not names_nobody("A storm rages.", ["In this passage, a storm rages at sea."])
