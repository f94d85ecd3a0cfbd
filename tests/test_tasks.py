"""Document tasks on a tiny random model: checkpoints, notes, ask/chat equivalences, saved states."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS

from lminf_cli.documents import Document
from lminf_cli.errors import InputError, UsageError
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.prompts import PromptFormat
from lminf_cli.settings import LambdaSettings
from lminf_cli.state_io import load_state, read_header, save_state
from lminf_cli.tasks import (
    ChatSession,
    EncodedDocument,
    ask,
    condense_notes,
    encode_document,
    plan_summary,
    section_bounds,
    summarize,
    tokenize,
)

SETTINGS = LambdaSettings(n_global=4, n_local=32, limit_distance=64)
TEXT = "\n".join(CORPUS.split(". "))  # lines, so sections can end at line breaks


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def engine(lm):
    return Engine(lm, SETTINGS.replace(chunk_size=16))


def doc(text: str = TEXT) -> Document:
    return Document(name="doc.txt", text=text)


def buffers(state):
    c = state.cache
    tensors = [t.clone() for layer in c.layers for t in (layer.k_ring, layer.v_ring, layer.k_global, layer.v_global)]
    return tensors, (c.length, c.base, c.rebases), state.logits.clone()


def assert_same(a, b):
    assert a[1] == b[1]
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert torch.equal(a[2], b[2])


def answer(engine, encoded, question, n=12):
    return "".join(ask(engine, encoded, question, n))  # the pieces as streamed, unstripped


# -- checkpoints ---------------------------------------------------------------

@pytest.mark.parametrize("doc_tokens,detour", [(200, 10), (200, 70), (2, 10), (47, 30)])
def test_checkpoint_restores_bit_identical_state(engine, doc_tokens, detour):
    ids = torch.arange(doc_tokens) % 90 + 3
    state = engine.encode(ids)
    before = buffers(state)
    rebases = state.cache.rebases
    cp = state.snapshot(detour)
    engine.encode(torch.arange(detour - 4) % 50 + 7, state)
    for _ in engine.generate_ids(state, 4):
        pass
    assert state.cache.length > before[1][0]
    if detour == 70:
        assert cp.cache.slots is None and state.cache.rebases > rebases  # the full-copy path, across a re-base
    if detour == 10 and doc_tokens == 200:
        assert cp.cache.slots is not None  # the cheap path: only the slots the detour can touch
    state.restore(cp)
    assert_same(buffers(state), before)


def test_continuing_after_a_detour_equals_never_detouring(engine):
    a, b = torch.arange(120) % 90 + 3, torch.arange(50) % 80 + 5
    plain = engine.encode(b, engine.encode(a))
    state = engine.encode(a)
    cp = state.snapshot(40)
    engine.encode(torch.arange(30) + 10, state)
    state.restore(cp)
    engine.encode(b, state)
    assert_same(buffers(state), buffers(plain))


def test_checkpoint_budget_is_enforced(engine):
    state = engine.encode(torch.arange(100) % 90 + 3)
    cp = state.snapshot(5)
    engine.encode(torch.arange(6) + 3, state)
    with pytest.raises(RuntimeError, match="budget"):
        state.restore(cp)


# -- encoding, sections, notes ------------------------------------------------------

def test_section_bounds_cover_everything_and_prefer_line_ends(engine):
    ids = tokenize(engine, TEXT)
    bounds = section_bounds(engine, ids, 40)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(ids)
    assert all(a < b and b == c for (a, b), (c, _) in zip(bounds, bounds[1:], strict=False))
    assert all(b - a <= 50 for a, b in bounds)
    tok = engine.lm.tokenizer
    newline = ["\n" in tok.decode([i]) for i in ids]
    for a, b in bounds[:-1]:
        # Ends after a line break whenever the last quarter of the section has one.
        assert newline[b - 1] or not any(newline[a + 30:a + 40]), (a, b)
    assert any(newline[b - 1] for _, b in bounds[:-1])


def test_notes_do_not_change_the_encoded_state(engine):
    calls = []
    with_notes = encode_document(engine, doc(), "tiny", notes=True, section_tokens=40, note_tokens=6,
                                 on_note=lambda k, n, note: calls.append((k, n, note)))
    without = encode_document(engine, doc(), "tiny", notes=False, section_tokens=40)
    assert [k for k, _, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][1] == len(calls) > 3
    assert [note for _, _, note in calls] == with_notes.notes
    assert without.notes == []
    assert_same(buffers(with_notes.state), buffers(without.state))


def test_auto_notes_only_for_documents_longer_than_the_window(engine):
    wide = Engine(engine.lm, LambdaSettings(4, 64, 64).replace(chunk_size=16))
    plain = encode_document(wide, doc("Time."), "tiny")
    total = plain.header.length + len(tokenize(wide, plain.header.tail))  # the held-back tail counts too
    assert total < 64
    fits = encode_document(wide, doc("Time."), "tiny", notes=None, reserve=64 - total, note_tokens=2)
    overflows = encode_document(wide, doc("Time."), "tiny", notes=None, reserve=65 - total, note_tokens=2)
    assert fits.notes == [] and len(overflows.notes) == 1


def test_progress_reaches_the_total(engine):
    seen = []
    encode_document(engine, doc(), "tiny", section_tokens=40, progress=lambda d, t: seen.append((d, t)))
    total = seen[-1][1]
    assert seen[-1][0] == total and all(d <= total for d, _ in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# -- ask and chat ----------------------------------------------------------------

def test_ask_leaves_the_document_state_untouched(engine):
    encoded = encode_document(engine, doc(), "tiny")
    before = buffers(encoded.state)
    first = answer(engine, encoded, "Who is Ishmael?")
    assert_same(buffers(encoded.state), before)
    assert answer(engine, encoded, "Who is Ishmael?") == first


def test_ask_equals_appending_to_the_stream(engine):
    """The answer from the checkpointed state == greedy continuation of head + doc + question, one stream."""
    encoded = encode_document(engine, doc(), "tiny")
    q = "What saves nine?"
    reply = ask(engine, encoded, q, 10)
    reply.text()
    stream = encode_document(engine, doc(), "tiny").state
    engine.encode(encoded.prompt_ids(engine, encoded.fmt.question(q)), stream)
    assert list(engine.generate_ids(stream, 10)) == reply.token_ids


def test_chat_without_history_equals_ask(engine):
    encoded = encode_document(engine, doc(), "tiny")
    questions = ["Who is Ishmael?", "What was the best of times?", "Which families are alike?"]
    session = ChatSession(engine, encoded, history=0, max_new_tokens=12)
    chat = ["".join(session.ask(q)) for q in questions]
    assert chat == [answer(engine, encoded, q) for q in questions]


def test_chat_history_replays_previous_turns_and_reset_forgets_them(engine):
    encoded = encode_document(engine, doc(), "tiny")
    session = ChatSession(engine, encoded, history=2, max_new_tokens=8)
    first = "".join(session.ask("Who is Ishmael?"))
    fmt = encoded.fmt
    expected = (encoded.prompt_ids(engine, fmt.question("Who is Ishmael?")) + session.turns[0].answer_ids
                + tokenize(engine, fmt.follow_up("And the fox?")))
    assert session.prompt_ids("And the fox?") == expected
    "".join(session.ask("And the fox?"))
    "".join(session.ask("Anything else?"))
    assert len(session.prompt_ids("x")) > len(tokenize(engine, fmt.question("x")))
    session.reset()
    assert "".join(session.ask("Who is Ishmael?")) == first
    assert session.transcript_text().count("Q: ") == 4


def test_empty_question_is_refused(engine):
    encoded = encode_document(engine, doc(), "tiny")
    with pytest.raises(UsageError, match="empty"):
        list(ask(engine, encoded, "   "))


# -- summaries -------------------------------------------------------------------

def test_summary_plan_and_note_condensing(engine):
    encoded = encode_document(engine, doc(), "tiny", notes=True, section_tokens=40, note_tokens=10)
    plan = plan_summary(engine, encoded, "short")
    assert plan.covers_whole_document and plan.notes == encoded.notes
    budget = len(tokenize(engine, encoded.fmt.part_summary(1, 1, encoded.notes))) // 2
    merged = condense_notes(engine, encoded, list(encoded.notes), budget, note_tokens=10)
    assert 1 <= len(merged) < len(encoded.notes)
    assert len(merged) == 1 or len(tokenize(engine, encoded.fmt.part_summary(1, 1, merged))) <= budget
    reply = summarize(engine, encoded, "short", 8, note_tokens=5)
    text = "".join(reply)
    assert len(reply.token_ids) <= 8 and text.strip() == reply.text()
    assert reply.notes and len(reply.notes) <= len(encoded.notes) and reply.covers_whole_document


def test_summary_without_notes_of_a_long_state_is_flagged(engine):
    encoded = encode_document(engine, doc(), "tiny", notes=False)
    assert not plan_summary(engine, encoded, "short").covers_whole_document


# -- prompt layout from a chat template ------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_prompt_format_from_chat_template(lm):
    tok = lm.tokenizer
    plain = PromptFormat.for_tokenizer(tok)
    assert not plain.templated
    old = tok.chat_template
    try:
        tok.chat_template = CHATML
        fmt = PromptFormat.for_tokenizer(tok)
        conv = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "U2"}]
        render = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert fmt.templated
        assert fmt.head + "U1" + fmt.user_end + "A1" + fmt.assistant_end + "U2" + fmt.user_end == render
        assert fmt.fingerprint != plain.fingerprint
    finally:
        tok.chat_template = old


# -- saved states -----------------------------------------------------------------

def test_state_round_trip_gives_the_same_answer(engine, tmp_path):
    encoded = encode_document(engine, doc(), "tiny", notes=True, section_tokens=60, note_tokens=5)
    path = tmp_path / "doc.lminf"
    save_state(path, encoded.state, encoded.header)
    header = read_header(path)
    assert header == encoded.header
    state = load_state(path, engine, header, encoded.fmt.fingerprint)
    loaded = EncodedDocument(state, encoded.fmt, header)
    assert_same(buffers(loaded.state), buffers(encoded.state))
    for q in ("Who is Ishmael?", "What saves nine?"):
        assert answer(engine, loaded, q, 20) == answer(engine, encoded, q, 20)


def test_short_document_state_stores_only_used_slots(engine, tmp_path):
    engine = Engine(engine.lm, SETTINGS.replace(chunk_size=256))  # a ring of 288 slots: a short document fills few
    small = encode_document(engine, doc("Call me Ishmael."), "tiny")
    big = encode_document(engine, doc(), "tiny")
    assert small.header.length < 100 < 288 < big.header.length
    a, b = tmp_path / "small.lminf", tmp_path / "big.lminf"
    save_state(a, small.state, small.header)
    save_state(b, big.state, big.header)
    assert a.stat().st_size < b.stat().st_size
    state = load_state(a, engine, read_header(a), small.fmt.fingerprint)
    assert answer(engine, EncodedDocument(state, small.fmt, small.header), "Who?") == answer(engine, small, "Who?")


def test_truncated_or_foreign_states_are_refused(engine, tmp_path, tiny_model_dir):
    encoded = encode_document(engine, doc(), "tiny")
    path = tmp_path / "doc.lminf"
    save_state(path, encoded.state, encoded.header)
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40, 3):
        bad = tmp_path / f"cut{cut}.lminf"
        bad.write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated or damaged"):
            read_header(bad)
    other = Engine(engine.lm, LambdaSettings(4, 16, 64).replace(chunk_size=16))
    with pytest.raises(InputError, match="n_local=32"):
        load_state(path, other, read_header(path), encoded.fmt.fingerprint)
    with pytest.raises(InputError, match="prompt layout"):
        load_state(path, engine, read_header(path), "0" * 16)
    from transformers import AutoModelForCausalLM

    from lminf_cli.models import from_hf
    torch.manual_seed(1)
    foreign = AutoModelForCausalLM.from_config(engine.lm.model.config)
    foreign_engine = Engine(from_hf(foreign, engine.lm.tokenizer, "foreign"), SETTINGS.replace(chunk_size=16))
    with pytest.raises(InputError, match="another model"):
        load_state(path, foreign_engine, read_header(path), encoded.fmt.fingerprint)


def test_non_state_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.lminf"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(InputError, match="not an lminf state"):
        read_header(path)


def test_fingerprint_ignores_dtype_but_not_weights(tiny_model_dir, lm):
    bf16 = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert bf16.fingerprint == lm.fingerprint


def test_runaway_blank_lines_end_a_reply_and_are_not_printed(capsys):
    from lminf_cli.cli.output import stream_text as _stream
    from lminf_cli.tasks import _RUNAWAY_BLANKS, _looping

    assert _RUNAWAY_BLANKS.search("An answer.\n\n \n\n")
    assert not _RUNAWAY_BLANKS.search("Para one.\n\nPara two.\n\n")
    line = "DROMIO OF SYRACUSE: I will, my lord, and so I will, my lord.\n"
    assert _looping("Prologue. " + line * 2) and not _looping("Prologue. " + line)
    _stream(iter(["\n ", "The ", "answer", ".", "\n\n", "Second", " line.", "\n", " \n", "\n"]))
    assert capsys.readouterr().out == "The answer.\n\nSecond line.\n"


# -- re-reading the passage the model looks at -------------------------------------

def test_locate_finds_a_span_and_leaves_the_state_alone(lm):
    from lminf_cli.tasks import locate

    settings = SETTINGS.replace(middle_top_k=3, middle_from_layer=0, chunk_size=16)
    engine = Engine(lm, settings)
    encoded = encode_document(engine, doc(), "tiny")
    assert encoded.outgrows_window and len(encoded.ids) == encoded.header.length
    before = buffers(encoded.state)
    prompt = encoded.prompt_ids(engine, encoded.fmt.question("Who is Ishmael?"))
    a, b = locate(engine, encoded, prompt, 40)
    assert_same(buffers(encoded.state), before)
    assert b - a == 40 and a >= 0 and b <= len(encoded.ids)
    # The hits it counted: positions of the middle (after the first tokens, before the window).
    assert a + 40 > settings.n_global
    # Without retrieval there is nothing to follow.
    plain = encode_document(Engine(lm, SETTINGS.replace(chunk_size=16)), doc(), "tiny")
    assert locate(engine, plain, prompt, 40) is None


def test_ask_with_reread_puts_the_passage_before_the_question(lm, monkeypatch):
    import lminf_cli.tasks as tasks

    settings = SETTINGS.replace(middle_top_k=3, middle_from_layer=0, chunk_size=16)
    engine = Engine(lm, settings)
    encoded = encode_document(engine, doc(), "tiny")
    seen = []
    real = tasks.reply
    monkeypatch.setattr(tasks, "reply", lambda e, st, ids, *rest: seen.append(ids) or real(e, st, ids, *rest))
    plain = ask(engine, encoded, "Who is Ishmael?", 6, reread=0).text()
    again = ask(engine, encoded, "Who is Ishmael?", 6, reread=40, reread_by="attention").text()
    span = tasks.locate(engine, encoded, seen[0], 40)
    passage = tasks.passage_text(engine, encoded.ids[span[0]:span[1]])
    assert passage and passage in engine.lm.tokenizer.decode(seen[1])
    assert seen[1] == encoded.prompt_ids(engine, encoded.fmt.question("Who is Ishmael?", passage))
    assert isinstance(plain, str) and isinstance(again, str)
    # A document that fits the window is asked exactly as before.
    wide = Engine(lm, LambdaSettings(4, 64, 64, chunk_size=16, middle_top_k=3, middle_from_layer=0))
    short = encode_document(wide, doc("Call me Ishmael. The whale is white."), "tiny")
    before = ask(wide, short, "Who?", 6, reread=0).token_ids  # no re-read: what ask did before it existed
    assert ask(wide, short, "Who?", 6, reread=40).token_ids == ask(wide, short, "Who?", 6).token_ids == before


def test_the_stream_ids_travel_with_a_saved_state(engine, tmp_path):
    from lminf_cli.tasks import open_state

    encoded = encode_document(engine, doc(), "tiny")
    path = tmp_path / "ids.lminf"
    save_state(path, encoded.state, encoded.header, encoded.ids)
    _, loaded = open_state(path, engine.lm, {"n_global": 4, "n_local": 32, "limit_distance": 64, "chunk_size": 16})
    assert torch.equal(loaded.ids, encoded.ids)


def test_bm25_prefers_the_passage_sharing_the_rarest_words():
    from lminf_cli.passages import bm25_scores, terms

    assert terms("What is the combination of THE iron vault?") == ["combination", "iron", "vault"]
    passages = ["The ships came home in winter and the keeper counted them.",
                "The combination of the iron vault is 7294, said the keeper.",
                "The keeper lived on the rock with the ships and the vault of heaven."]
    scores = bm25_scores(passages, "What is the combination of the iron vault?")
    assert max(range(3), key=scores.__getitem__) == 1 and scores[0] == 0 < scores[2] < scores[1]
    assert bm25_scores(passages, "Who?") == [0.0, 0.0, 0.0]


def test_locate_words_finds_the_planted_sentence(lm):
    from lminf_cli.tasks import locate_words

    engine = Engine(lm, SETTINGS.replace(chunk_size=16))
    fact = "The combination of the iron vault is 7294."
    text = TEXT + "\n" + fact + "\n" + TEXT + "\n" + TEXT
    encoded = encode_document(engine, doc(text), "tiny")
    a, b = locate_words(engine, encoded, "What is the combination of the iron vault?", 80)
    assert fact in engine.lm.tokenizer.decode(encoded.ids[a:b].tolist())
    assert locate_words(engine, encoded, "Zebra quagga?", 80) is None
    # Inside the last window too: the small model misses facts there from a distance as well.
    engine = Engine(lm, SETTINGS.replace(chunk_size=16, n_local=64, limit_distance=64))
    late = encode_document(engine, doc(TEXT + "\n" + TEXT + "\n" + fact + "\nThe end."), "tiny")
    tail = engine.lm.tokenizer.decode(late.ids[-engine.settings.n_local:].tolist())
    assert late.outgrows_window and fact in tail  # the fact lies in the window the model reads directly
    a, b = locate_words(engine, late, "What is the combination of the iron vault?", 80)
    assert fact in engine.lm.tokenizer.decode(late.ids[a:b].tolist())


# -- how replies end -------------------------------------------------------------

class _ScriptedEngine:
    """An engine whose replies are a fixed text, one character per token (for the reply logic alone)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def encode(self, ids, state):
        return state

    def stream_generate(self, state, max_new_tokens, sampling):
        from lminf_cli.generate import GenerationResponse

        n = min(len(self.text), max_new_tokens)
        for i, ch in enumerate(self.text[:n]):
            yield GenerationResponse(ch, i, i + 1, 1.0, 0)
        yield GenerationResponse("", None, n, 1.0, 0, "stop" if n == len(self.text) else "length")


class _FakeState:
    restored = 0

    def snapshot(self, budget):
        return None

    def restore(self, snap):
        self.restored += 1


def _scripted_reply(text: str, n: int = 10_000):
    from lminf_cli.tasks import reply

    state = _FakeState()
    return reply(_ScriptedEngine(text), state, [1], n), state


def test_a_looping_reply_ends_at_its_last_complete_sentence():
    # What `ask` printed before: "...to allow multiple" (cut mid-sentence by the loop guard).
    loop = "The keeper lit the lamp at dusk to allow multiple ships to find the harbour "
    r, state = _scripted_reply("Orla kept the light. She counted the ships. " + loop * 4)
    assert r.text() == "Orla kept the light. She counted the ships."
    assert r.finish_reason == "loop" and state.restored == 1


def test_replies_that_end_by_themselves_or_at_the_budget_are_released_whole():
    r, _ = _scripted_reply("An answer. Without a final stop")
    assert r.text() == "An answer. Without a final stop" and r.finish_reason == "stop"
    r, _ = _scripted_reply("An answer that is cut. At the budget", n=27)
    assert r.text() == "An answer that is cut. At t" and r.finish_reason == "length"
    pieces = list(_scripted_reply("3.14 is pi. A wrapped\nline. A paragraph\n\nand more")[0])
    assert pieces[:3] == ["3.14 is pi.", " A wrapped\nline.", " A paragraph\n\n"]
    assert "".join(pieces) == "3.14 is pi. A wrapped\nline. A paragraph\n\nand more"
    # Hard-wrapped lines break mid-sentence: a loop guard stop goes back to the sentence's start.
    loop = "the text wraps here and\ncontinues on the next line without end, "
    r, _ = _scripted_reply("First sentence. A wrapped\nsentence that " + loop * 4)
    assert r.text() == "First sentence." and r.finish_reason == "loop"


def test_cancel_ends_at_the_last_sentence_and_restores_the_state(engine):
    encoded = encode_document(engine, doc(), "tiny")
    before = buffers(encoded.state)
    r, state = _scripted_reply("First sentence. Second sentence. Third one that never ends " * 3)
    pieces = []
    for piece in r:
        pieces.append(piece)
        if len(pieces) == 2:
            r.cancel()
    assert "".join(pieces) == "First sentence. Second sentence." and r.finish_reason == "cancelled"
    assert state.restored == 1
    # On the real engine: a cancelled answer leaves the document state as it was, bit for bit.
    session = ChatSession(engine, encoded, history=2, max_new_tokens=40)
    response = session.ask("Who is Ishmael?")
    response.cancel()  # before the first token: the reply stops after it
    assert response.text() == "" and response.finish_reason == "cancelled" and len(response.token_ids) == 1
    assert_same(buffers(encoded.state), before)
    assert session.turns == [] and len(session.transcript) == 1  # not replayed to the model


def test_system_prompt_goes_through_the_chat_template(lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm.tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    plain, system = PromptFormat.for_tokenizer(tok), PromptFormat.for_tokenizer(tok, "Answer in French.")
    want = tok.apply_chat_template([{"role": "system", "content": "Answer in French."},
                                    {"role": "user", "content": "DOC"}], tokenize=False, add_generation_prompt=True)
    assert system.head + "DOC" + system.user_end == want
    assert plain.head == "<|user|>" and system.fingerprint != plain.fingerprint
    # A template that refuses a system role gets it at the start of the user's turn.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    folded = PromptFormat.for_tokenizer(tok, "Answer in French.")
    assert folded.templated and folded.head == "<|user|>Answer in French.\n\n"


def test_a_state_needs_the_system_prompt_it_was_encoded_with(engine, lm, tmp_path):
    from lminf_cli.tasks import open_state

    encoded = encode_document(engine, doc(), "tiny", system="Be brief.")
    path = tmp_path / "s.lminf"
    save_state(path, encoded.state, encoded.header)
    requested = SETTINGS.replace(chunk_size=16).to_dict()
    requested = {k: requested[k] for k in ("n_global", "n_local", "limit_distance", "chunk_size")}
    _, again = open_state(path, lm, requested, system="Be brief.")
    assert again.fmt == encoded.fmt
    for system, match in ((None, "give the same --system"), ("Be long.", "another system prompt")):
        with pytest.raises(UsageError, match=match):
            open_state(path, lm, requested, system=system)
    plain = encode_document(engine, doc(), "tiny")
    save_state(path, plain.state, plain.header)
    with pytest.raises(UsageError, match="encoded without a system prompt"):
        open_state(path, lm, requested, system="Be brief.")
