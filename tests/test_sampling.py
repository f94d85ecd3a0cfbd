"""The sampler against transformers' generate(): the same distributions, the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import GenerationConfig, RepetitionPenaltyLogitsProcessor

from lminf_cli.errors import SettingsError
from lminf_cli.generate import Engine, StopText
from lminf_cli.models import from_hf
from lminf_cli.sampling import (
    ANSWER_DEFAULTS,
    CONTINUE_DEFAULTS,
    MAX_REPEAT_LAST_N,
    SamplingParams,
    make_sampler,
    model_defaults,
)
from lminf_cli.settings import LambdaSettings

CPU = torch.device("cpu")

SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.8, min_p=0.1),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repeat_penalty=1.3),
    dict(temperature=1.0, repeat_penalty=0.7),  # < 1 rewards repeats
    dict(temperature=0.0, repeat_penalty=1.5),  # greedy over penalized logits
]


def _hf_config(p: SamplingParams) -> GenerationConfig:
    """The generate() settings that mean what `p` means (top_k 0: no top-k, unlike generate's default 50)."""
    return GenerationConfig(do_sample=not p.greedy, temperature=p.temperature or None, top_k=p.top_k,
                            top_p=p.top_p, min_p=p.min_p or None, repetition_penalty=p.repeat_penalty,
                            max_new_tokens=4, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_distribution_equals_generate_scores(kw):
    # generate(output_scores=True) returns the scores after its own processors and warpers:
    # the distribution it samples from.  The sampler, fed the same logits and the same history
    # (the prompt and the tokens generate drew), must give the same distribution at every step.
    model = tiny_llama(4, 2, trained=64)
    p = SamplingParams(**kw, repeat_last_n=MAX_REPEAT_LAST_N)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    out = model.generate(ids, generation_config=_hf_config(p), output_scores=True, return_dict_in_generate=True)
    seq = out.sequences[0]
    assert len(out.scores) == 4
    for t, hf_scores in enumerate(out.scores):
        prefix = seq[: ids.shape[1] + t]
        with torch.no_grad():
            logits = model(prefix[None]).logits[0, -1]
        sampler = make_sampler(p, CPU, prefix.tolist())
        ours = sampler.probs(logits)
        if p.greedy:
            assert int(ours.argmax()) == int(hf_scores[0].argmax()) == int(seq[ids.shape[1] + t])
        else:
            torch.testing.assert_close(ours, torch.softmax(hf_scores[0].float(), -1), atol=1e-6, rtol=1e-5)


def test_draws_follow_the_distribution():
    logits = torch.randn(97, generator=torch.Generator().manual_seed(1)) * 2
    p = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.02, seed=3)
    sampler = make_sampler(p, CPU)
    probs = sampler.probs(logits)
    n = 20000
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(n)]), minlength=97).float()
    assert (counts[probs == 0] == 0).all()  # filtered tokens are never drawn
    assert 0.5 * (counts / n - probs).abs().sum() < 0.02  # total variation


def test_greedy_is_the_argmax():
    g = torch.Generator().manual_seed(2)
    sampler = make_sampler(SamplingParams(), CPU)
    for _ in range(20):
        logits = torch.randn(1000, generator=g)
        assert sampler(logits) == int(torch.argmax(logits))
    # --temperature 0 given: the default penalty is dropped, a given one stays
    assert CONTINUE_DEFAULTS.resolve({"temperature": 0}).penalized is False
    assert CONTINUE_DEFAULTS.resolve({"temperature": 0, "repeat_penalty": 1.2}).repeat_penalty == 1.2
    assert CONTINUE_DEFAULTS.resolve({"top_k": 5, "stop": ["x"]}) == CONTINUE_DEFAULTS.replace(top_k=5, stop=("x",))


def test_penalty_window_is_the_last_n_tokens():
    g = torch.Generator().manual_seed(4)
    history = torch.randint(0, 50, (40,), generator=g).tolist()
    p = SamplingParams(repeat_penalty=1.8, repeat_last_n=16)
    sampler = make_sampler(p, CPU, history)
    seen = list(history)
    for _ in range(30):  # the ring wraps around several times
        logits = torch.randn(50, generator=g)
        ref = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([seen[-16:]]), logits[None].clone())[0]
        assert torch.equal(sampler.scores(logits)[0], ref)
        token = sampler(logits)
        assert token == int(ref.argmax())
        seen.append(token)


def test_greedy_with_penalty_equals_generate():
    # Inside the window the engine computes the unmodified model, so greedy decoding with a
    # penalty over the whole sequence is generate(do_sample=False, repetition_penalty=...).
    model = tiny_llama(4, 2, trained=64)
    lm = from_hf(model, None)
    engine = Engine(lm, LambdaSettings.for_model(64, n_global=4))
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(6))
    want = model.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.4, eos_token_id=None,
                          pad_token_id=0)[0, 10:].tolist()
    plain = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 10:]
    assert want != plain.tolist()  # the penalty changes this output, so the comparison means something
    state = engine.encode(ids[0].tolist())
    got = list(engine.generate_ids(state, 24, SamplingParams(repeat_penalty=1.4, repeat_last_n=64), stop_ids=[]))
    assert got == want


def test_same_seed_same_draws():
    logits = torch.randn(97, generator=torch.Generator().manual_seed(7))
    p = SamplingParams(temperature=1.5, seed=11)
    a, b = make_sampler(p, CPU), make_sampler(p, CPU)
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]


@pytest.mark.parametrize("bad,setting", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=2), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(repeat_penalty=0), "repeat_penalty"),
    (dict(repeat_penalty=-1), "repeat_penalty"), (dict(repeat_last_n=-1), "repeat_last_n"),
    (dict(repeat_last_n=MAX_REPEAT_LAST_N + 1), "repeat_last_n"), (dict(seed=-1), "seed"),
    (dict(stop=("",)), "stop"),
])
def test_bad_settings_name_the_setting(bad, setting):
    with pytest.raises(SettingsError) as e:
        SamplingParams(**bad)
    assert e.value.setting == setting


def test_model_generation_config_defaults():
    assert model_defaults(GenerationConfig(), "continue") == CONTINUE_DEFAULTS
    assert model_defaults(None, "answer") == ANSWER_DEFAULTS
    shipped = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9)
    got = model_defaults(shipped, "continue")
    # as generate() reads it: what the model leaves unset takes generate()'s defaults (top-k 50, no penalty)
    assert (got.temperature, got.top_p, got.top_k, got.min_p, got.repeat_penalty) == (0.6, 0.9, 50, 0.0, 1.0)
    assert model_defaults(shipped, "answer") == ANSWER_DEFAULTS  # answers stay greedy
    assert model_defaults(GenerationConfig(temperature=0.6), "continue").greedy  # no do_sample: greedy
    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    assert model_defaults(qwen, "answer") == ANSWER_DEFAULTS.replace(repeat_penalty=1.05)
    assert model_defaults(qwen, "continue").repeat_penalty == 1.05


def test_stop_text_holds_back_what_may_begin_a_stop_sequence():
    st = StopText(["\nQ:", "END"])
    assert st.push("Hello") == ("Hello", False)
    assert st.push(" E") == (" ", False)       # "E" may begin END
    assert st.push("x") == ("Ex", False)       # it did not
    assert st.push("\n") == ("", False)
    assert st.push("Q") == ("", False)
    assert st.push(": next") == ("", True)     # split over three deltas
    assert st.flush() == ""
    st = StopText(["END"])
    assert st.push("a EN") == ("a ", False)
    assert st.flush() == "EN"                  # the stream ended first: nothing was a stop
    assert StopText([]).push("END") == ("END", False)


def test_stop_sequence_ends_the_stream_at_its_first_occurrence(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = from_hf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir))
    engine = Engine(lm, LambdaSettings.for_model(64, n_global=4))
    ids = lm.tokenizer.encode("It was the best of times, it was the worst")
    p = SamplingParams(temperature=1.0, seed=2)
    full = engine.generate(engine.encode(ids), 60, p, stop_ids=[])
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    responses = list(engine.stream_generate(engine.encode(ids), 60, p.replace(stop=(stop,)), stop_ids=[]))
    assert "".join(r.text for r in responses) == full[: full.index(stop)]
    assert responses[-1].finish_reason == "stop"
