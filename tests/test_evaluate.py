"""Core of `lminf eval`: scoring against references, buckets, budgets, passkey prompts and scoring."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from lminf_cli.errors import UsageError
from lminf_cli.eval import baseline, passkey, ppl
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf
from lminf_cli.settings import LambdaSettings


class _NoTokenizer:
    eos_token_id = None


@pytest.fixture(scope="module")
def lm():
    return from_hf(tiny_llama(trained=16), _NoTokenizer(), "tiny")


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 97, (120,))


@torch.no_grad()
def full_nll(model, ids):
    """NLL of tokens 1..n-1 from one dense forward over the whole sequence."""
    logits = model(ids.reshape(1, -1).to(model.device)).logits[0, :-1].float().cpu()  # [n-1, V]
    return -torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]


# -- buckets -------------------------------------------------------------------------


def test_bucket_means_by_hand():
    nll = torch.arange(1.0, 10.0)  # positions 1..9 (n = 10)
    b = ppl.bucket_means(nll, 4)
    assert [(x.start, x.end, x.tokens) for x in b] == [(0, 4, 3), (4, 8, 4), (8, 10, 2)]
    assert [x.nll for x in b] == [2.0, 5.5, 8.5]
    assert b[1].ppl == pytest.approx(math.exp(5.5))
    # Asked for more positions than scored: the rest are empty buckets.
    b = ppl.bucket_means(nll[:5], 4, n_tokens=10)  # positions 1..5
    assert [x.tokens for x in b] == [3, 2, 0] and math.isnan(b[2].nll)


def test_bucket_means_weights_every_token_once():
    nll = torch.rand(1000, dtype=torch.float64)
    for size in (1, 7, 64, 1001, 5000):
        b = ppl.bucket_means(nll, size)
        assert sum(x.tokens for x in b) == 1000
        assert sum(x.nll * x.tokens for x in b if x.tokens) == pytest.approx(float(nll.sum()))


def test_span_mean_and_bad_bucket():
    nll = torch.arange(1.0, 10.0)
    assert ppl.span_mean(nll, 4, 8) == 5.5 and ppl.span_mean(nll, 0, 2) == 1.0
    with pytest.raises(UsageError):
        ppl.bucket_means(nll, 0)


# -- the three scorers against references ------------------------------------------


@pytest.mark.parametrize("chunk", [7, 64, 500])
def test_dense_nll_equals_one_forward(lm, ids, chunk):
    r = baseline.DenseModel(lm, chunk_size=chunk).nll(ids)
    assert r.stop_reason is None and r.tokens_read == len(ids) and r.method == baseline.VANILLA
    torch.testing.assert_close(r.nll, full_nll(lm.model, ids), atol=1e-5, rtol=1e-5)


def test_lminf_equals_dense_inside_window_and_differs_beyond(lm, ids):
    ref = full_nll(lm.model, ids)
    wide = ppl.lminf_nll(Engine(lm, LambdaSettings(4, 128, 128).replace(chunk_size=16)), ids)
    torch.testing.assert_close(wide.nll, ref, atol=1e-5, rtol=1e-5)
    narrow = ppl.lminf_nll(Engine(lm, LambdaSettings(4, 16, 16).replace(chunk_size=16)), ids)
    torch.testing.assert_close(narrow.nll[:15], ref[:15], atol=1e-5, rtol=1e-5)
    assert (narrow.nll[20:] - ref[20:]).abs().max() > 1e-3


@torch.no_grad()
def naive_window_nll(model, ids, window, stride):
    """Token by token: the context the truncation baseline promises, read from scratch."""
    out = []
    for p in range(1, len(ids)):
        if p < window:
            start = 0
        else:
            a = window + (p - window) // stride * stride
            start = min(a + stride, len(ids)) - window
        assert p - start <= window - 1
        logits = model(ids[start:p + 1].reshape(1, -1).to(model.device)).logits[0, -2].float().cpu()
        out.append(-torch.log_softmax(logits, -1)[ids[p]])
    return torch.stack(out)


@pytest.mark.parametrize(("window", "stride", "chunk"), [(16, 5, 7), (16, 8, 16), (20, 19, 3)])
def test_window_nll_matches_naive_truncation(lm, ids, window, stride, chunk):
    r = baseline.DenseModel(lm, chunk_size=chunk).window_nll(ids, window, stride)
    assert r.method == baseline.WINDOW and r.tokens_read == len(ids)
    torch.testing.assert_close(r.nll, naive_window_nll(lm.model, ids, window, stride), atol=1e-5, rtol=1e-5)
    # Inside the window it is the unmodified model; far beyond it is not.
    ref = full_nll(lm.model, ids)
    torch.testing.assert_close(r.nll[:window - 1], ref[:window - 1], atol=1e-5, rtol=1e-5)
    assert (r.nll[window + 10:] - ref[window + 10:]).abs().max() > 1e-3


def test_window_stride_checked(lm, ids):
    with pytest.raises(UsageError):
        baseline.DenseModel(lm).window_nll(ids, 16, 16)  # the first token of a stride would see nothing


# -- budgets -------------------------------------------------------------------------


def test_length_budget_stops_with_reason(lm, ids):
    r = baseline.DenseModel(lm, chunk_size=8, budget=baseline.Budget(max_tokens=50)).nll(ids)
    assert r.tokens_read == 50 and "length limit of 50" in r.stop_reason
    torch.testing.assert_close(r.nll, full_nll(lm.model, ids)[:49], atol=1e-5, rtol=1e-5)
    w = baseline.DenseModel(lm, chunk_size=8, budget=baseline.Budget(max_tokens=50)).window_nll(ids, 16, 8)
    assert w.tokens_read == 50 and w.stop_reason


def test_time_budget_stops_before_reading(lm, ids):
    r = baseline.DenseModel(lm, budget=baseline.Budget(seconds=1e-9)).nll(ids)
    assert r.tokens_read == 0 and "time budget" in r.stop_reason


def test_memory_budget_stops_at_the_chunk_that_would_not_fit(lm, ids):
    dense = baseline.DenseModel(lm, chunk_size=8)
    dense.budget = baseline.Budget(memory_bytes=dense.memory_needed(8, 100))
    r = dense.nll(ids)
    assert r.stop_reason.startswith("out of memory") and r.tokens_read == 96
    torch.testing.assert_close(r.nll, full_nll(lm.model, ids)[:95], atol=1e-5, rtol=1e-5)


def test_out_of_memory_recognised():
    assert baseline.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                            "can't allocate memory: you tried to allocate 1000 bytes"))
    assert baseline.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not baseline.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not baseline.is_out_of_memory(ValueError("out of memory"))


# -- report --------------------------------------------------------------------------


def test_flatness_and_report():
    L = 8
    nll = torch.full((63,), 3.0)          # positions 1..63
    nll[4 * L - 1:5 * L - 1] = 3.5        # positions 32..39: one bad span
    f = ppl.flatness(nll, L)
    assert f["reference"] == {"start": 4, "end": 8, "nll": 3.0}
    assert [(s["start"], s["end"]) for s in f["spans"]] == [(8, 12), (12, 16), (16, 20), (20, 24), (24, 28),
                                                            (28, 32), (32, 36), (36, 40), (40, 44), (44, 48),
                                                            (48, 52), (52, 56), (56, 60), (60, 64)]
    assert f["max_deviation"] == pytest.approx(0.5)
    assert ppl.flatness(nll[:5], L) is None

    base = baseline.Scored(baseline.WINDOW, nll + 0.25, 1.0, 64)
    cut = baseline.Scored(baseline.VANILLA, nll[:20], 1.0, 64, "time budget of 1 s spent")
    rep = ppl.ppl_report([baseline.Scored(baseline.LMINF, nll, 1.0, 64), base, cut], 16, L, {"model": "m"})
    assert rep["tokens"] == 64 and rep["model"] == "m"
    assert [b["tokens"] for b in rep["methods"][baseline.VANILLA]["buckets"]] == [15, 5, 0, 0]
    assert rep["methods"][baseline.VANILLA]["stopped_at"] == 21 and rep["methods"][baseline.LMINF]["stopped_at"] is None
    w = rep["summary"]["past_trained_length_vs_window"]
    assert (w["start"], w["end"]) == (8, 64)
    assert w["window"] - w["lminf"] == pytest.approx(0.25)
    v = rep["summary"]["past_trained_length_vs_vanilla"]
    assert (v["start"], v["end"]) == (8, 21)


def test_sparkline():
    assert ppl.sparkline([0.0, 1.0, float("nan"), 0.5], 0.0, 1.0) == "▁█ ▅"
    assert ppl.sparkline([2.0] * 3, 2.0, 2.0) == "▁▁▁"
    assert len(ppl.sparkline(list(range(250)), 0, 250, width=100)) == 84  # groups of 3


# -- passkey -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("length", [1500, 3000, 6000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(tok, length, depth):
    p = passkey.passkey_prompt(tok, length, depth, 31337)
    assert abs(len(p.ids) - length) <= 0.02 * length
    text = tok.decode(p.ids)
    assert text.startswith(passkey.PASSKEY_TASK) and text.endswith("What is the pass key? The pass key is")
    assert text.count("31337") == 2 and text.count("The pass key is 31337. Remember it.") == 1
    # The key line starts exactly at key_position, at the requested depth.
    assert tok.decode(p.ids[p.key_position:]).startswith("The pass key is 31337.")
    assert tok.decode(p.ids[:p.key_position]).rstrip().endswith((".", "there."))
    if 0 < depth < 1:
        assert abs(p.depth_actual - depth) < 0.02
    tail = text[text.index("31337 is the pass key."):]
    filler_after = len(re.findall(r"\. ", tail))
    if depth == 0.0:
        assert text.index("The pass key is 31337") == len(passkey.PASSKEY_TASK) + 1
    if depth == 1.0:
        assert filler_after == 0  # nothing between the key line and the question


def test_passkey_prompt_rejects(tok):
    with pytest.raises(UsageError):
        passkey.passkey_prompt(tok, 1000, 1.5, 1)
    with pytest.raises(UsageError):
        passkey.passkey_prompt(tok, 10, 0.5, 1)  # cannot hold the fixed text
    with pytest.raises(UsageError):
        passkey.passkey_prompt(tok, 1000, 0.5, 1, template="chat")  # no chat template
    with pytest.raises(UsageError):
        passkey.passkey_prompt(tok, 1000, 0.5, 1, template="fancy")


def test_parse_depths():
    assert passkey.parse_depths("0.1,0.3,0.5") == [0.1, 0.3, 0.5]
    assert passkey.parse_depths("0,1") == [0.0, 1.0]
    for bad in ["", "1.5", "-0.1", "half", "0.1,,0.2", "nan"]:
        with pytest.raises(UsageError):
            passkey.parse_depths(bad)


def test_passkey_keys_reproducible():
    a = [passkey.passkey_key(0, 4096, 0.5, i) for i in range(20)]
    assert a == [passkey.passkey_key(0, 4096, 0.5, i) for i in range(20)]
    assert len(set(a)) > 15 and all(1 <= k <= 50000 for k in a)
    assert a != [passkey.passkey_key(1, 4096, 0.5, i) for i in range(20)]


def test_answer_scoring(tok):
    assert passkey.first_integer(" 12345. Remember it.") == 12345
    assert passkey.first_integer("the pass key is the pass key") is None
    assert passkey.first_integer("007 and 8") == 7
    assert passkey.answer_complete(" 123.") and not passkey.answer_complete(" 123")
    ids = tok.encode(" 4711. Remember it. 4711 is the pass key.")
    text = passkey.read_answer(iter(ids), tok)
    assert passkey.first_integer(text) == 4711 and text.startswith(" 4711") and len(text) < 12


def test_run_passkey_and_grid(tok):
    prompts = [(i, passkey.passkey_prompt(tok, 600, d, passkey.passkey_key(0, 600, d, i)))
               for d in (0.2, 0.8) for i in range(2)]

    def answer(p):
        if p.depth == 0.8 and p.key % 2 == 0:
            raise baseline.BudgetStop("time budget of 1 s spent")
        return f" {p.key}." if p.depth == 0.2 else " 0."

    res = passkey.run_passkey("lminf", prompts, answer)
    assert [r.correct for r in res[:2]] == [True, True]
    assert not any(r.correct for r in res[2:])
    grid = passkey.passkey_grid(res)["lminf"][600]
    assert grid[0.2].accuracy == 1.0 and grid[0.2].total == 2
    skipped = sum(1 for r in res[2:] if r.skipped)
    assert grid[0.8].skipped == skipped and grid[0.8].total == 2 - skipped
    j = passkey.PasskeyReport({"model": "m"}, [600], [0.2, 0.8], res).to_json()
    assert j["accuracy"]["lminf"]["600"]["0.2"]["accuracy"] == 1.0 and len(j["results"]) == 4


def test_greedy_answers_agree_with_hf_generate(lm, ids):
    prompt = ids[:40]
    dense = baseline.DenseModel(lm, chunk_size=16)
    ours = list(dense.generate_greedy(prompt, 10))
    with torch.no_grad():
        hf = lm.model.generate(prompt.reshape(1, -1), max_new_tokens=10, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, 40:].tolist()
    assert ours == hf
    engine = Engine(lm, LambdaSettings(4, 64, 64).replace(chunk_size=16))
    state = engine.encode(prompt)
    assert list(engine.generate_ids(state, 10, stop_ids=[])) == hf
    with pytest.raises(baseline.BudgetStop):
        list(baseline.DenseModel(lm, budget=baseline.Budget(max_tokens=20)).generate_greedy(prompt, 3))


def test_kv_cache_keyword_follows_the_transformers_version():
    # transformers 5.24 renamed past_key_values to cache; the dense baselines speak both.
    from types import SimpleNamespace

    from lminf_cli.models import past_keyword, past_of

    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    class New:
        def forward(self, input_ids, cache=None, use_cache=None): ...

    assert past_keyword(Old()) == "past_key_values"
    assert past_keyword(New()) == "cache"
    assert past_of(SimpleNamespace(past_key_values="old")) == "old"
    assert past_of(SimpleNamespace(cache="new", past_key_values="new")) == "new"
