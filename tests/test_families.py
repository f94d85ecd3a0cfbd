"""Every supported family against the same references as Llama: the unmodified HF model
inside the window, a dense Λ reference with the family's distance rule beyond it,
chunked == one-shot, constant cache bytes, and one `lminf continue` through the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tiny_tokenizer
from families import FAMILIES, ROPE, build, dense_lambda_reference
from typer.testing import CliRunner

from lminf_cli.adapters import supported_model_types
from lminf_cli.cli.app import app
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf, load_model
from lminf_cli.settings import LambdaSettings

NAMES = [f.name for f in FAMILIES]
runner = CliRunner()


def run_chunks(lm, settings, ids, chunk, fused=True):
    """Logits for every position, fed through the engine `chunk` tokens at a time."""
    engine = Engine(lm, settings.replace(chunk_size=chunk), fused=fused)
    cache = engine.new_cache()
    parts = [engine.forward(cache, ids[:, s:s + chunk], rows=slice(None)) for s in range(0, ids.shape[1], chunk)]
    return torch.cat(parts, dim=1), cache


def ids_for(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (1, n), generator=g).to(DEVICE)


@pytest.mark.parametrize("name", NAMES)
def test_registry_covers_family(name):
    model = build(name, device=DEVICE)
    lm = from_hf(model, None)
    assert model.config.model_type in supported_model_types()
    assert lm.adapter.model_types and model.config.model_type in lm.adapter.model_types
    assert lm.adapter.trained_length == 16


@pytest.mark.parametrize("name", NAMES)
def test_equals_unmodified_model_inside_window(name):
    model = build(name, device=DEVICE)
    lm = from_hf(model, None)
    ids = ids_for(16)
    ref = model(ids).logits
    for chunk in (1, 5, 16):
        ours, _ = run_chunks(lm, LambdaSettings.for_model(16, n_global=4), ids, chunk)
        assert torch.allclose(ours, ref, atol=1e-4), (chunk, (ours - ref).abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_hf_inside_window_and_differs_beyond(name):
    # Guards the reference itself, on a length HF can run for every family.
    model = build(name, device=DEVICE)
    ids = ids_for(16)
    hf = model(ids).logits
    ref = dense_lambda_reference(name, model, ids, n_local=4, n_global=2, limit=12)
    assert torch.allclose(ref[:, :4], hf[:, :4], atol=1e-4)
    assert (ref[:, 6:] - hf[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_global,n_local,limit", [(3, 8, 12), (5, 6, 6)])
def test_equals_dense_lambda_reference_beyond_window(name, n_global, n_local, limit):
    model = build(name, device=DEVICE)
    lm = from_hf(model, None)
    ids = ids_for(70)
    ref = dense_lambda_reference(name, model, ids, n_local, n_global, limit)
    for chunk, fused in ((1, True), (7, True), (32, True), (7, False)):
        ours, cache = run_chunks(lm, LambdaSettings(n_global, n_local, limit), ids, chunk, fused)
        assert torch.allclose(ours, ref, atol=1e-4), (chunk, fused, (ours - ref).abs().max())
        if chunk < 32:
            assert cache.rebases > 0  # long enough to re-base relative positions on the way


@pytest.mark.parametrize("name", NAMES)
def test_split_local_branch_equals_dense_reference(name):
    # Blocks of >= 32 queries on a full window take the split local branch on CPU
    # (LocalSplit; not ALiBi, softcap or a layer's own window, which keep the full mask).
    model = build(name, device=DEVICE)
    lm = from_hf(model, None)
    ids = ids_for(200)
    ref = dense_lambda_reference(name, model, ids, 40, 3, 48)
    ours, _ = run_chunks(lm, LambdaSettings(3, 40, 48), ids, 33)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_chunked_nll_equals_one_shot_and_cache_is_constant(name):
    lm = from_hf(build(name, device=DEVICE), None)
    ids = ids_for(90)
    settings = LambdaSettings(4, 12, 16)
    one_shot = Engine(lm, settings.replace(chunk_size=90)).token_nll(ids)
    for chunk in (1, 13):
        assert torch.allclose(Engine(lm, settings.replace(chunk_size=chunk)).token_nll(ids), one_shot, atol=1e-4), chunk
    engine = Engine(lm, settings.replace(chunk_size=8))
    state = engine.encode(ids[0, :16])
    before = state.cache.nbytes
    engine.encode(ids[0, 16:], state=state)
    for token in range(20):
        engine.step(state, token)
    assert state.n_tokens == 110 and state.cache.nbytes == before


def test_sliding_window_model_keeps_its_own_rule_at_any_length():
    # Mistral slides on every layer: past the window lminf is still exactly HF.
    model = build("mistral", device=DEVICE)
    lm = from_hf(model, None)
    ids = ids_for(48)
    ours, cache = run_chunks(lm, LambdaSettings.for_model(16, n_global=4), ids, 8)
    assert cache.settings.n_local == 6  # the ring is no wider than the model's window
    assert torch.allclose(ours, model(ids).logits, atol=1e-4)


def test_per_layer_windows():
    windows = {name: from_hf(build(name), None).adapter.layer_windows() for name in ("gemma2", "qwen2", "llama")}
    assert windows == {"gemma2": [6, None], "qwen2": [None, 6], "llama": [None, None]}


@pytest.mark.parametrize("name", ["phi3-longrope"])
def test_longrope_uses_original_length_and_short_factors(name):
    lm = from_hf(build(name), None)
    assert lm.adapter.trained_length == 16 and lm.model.config.max_position_embeddings == 64
    assert torch.equal(lm.adapter.rope.inv_freq, lm.model.model.rotary_emb.original_inv_freq.cpu())


@pytest.mark.parametrize("name", ROPE[:1] + ["gemma2", "mpt"])
def test_fused_and_eager_attention_agree_on_decode(name):
    lm = from_hf(build(name, device=DEVICE), None)
    ids = ids_for(40)
    a, _ = run_chunks(lm, LambdaSettings(3, 8, 12), ids, 1, fused=True)
    b, _ = run_chunks(lm, LambdaSettings(3, 8, 12), ids, 1, fused=False)
    assert torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------------------
# Through the CLI

TEXT = "It was the best of times, it was the worst of times. " * 12


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A saved model directory (tiny tokenizer + random weights) per family, made on demand."""
    made = {}

    def get(name):
        if name not in made:
            tok = tiny_tokenizer()
            model = build(name, vocab=len(tok), trained=64, eos_token_id=tok.eos_token_id, bos_token_id=None,
                          pad_token_id=None)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            made[name] = path
        return made[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_cli_continue_matches_python_api(name, family_dirs, tmp_path):
    path = family_dirs(name)
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    r = runner.invoke(app, ["continue", str(doc), "--model", str(path), "-n", "8", "--n-local", "16",
                            "--n-global", "4", "--chunk-size", "8", "--device", "cpu", "--temperature", "0"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    lm = load_model(str(path), device="cpu")
    ids = lm.tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > 16  # the document runs past the window
    engine = Engine(lm, LambdaSettings.for_model(lm.adapter.trained_length, n_global=4, n_local=16, chunk_size=8))
    expected = engine.generate(engine.encode(ids), 8)
    assert r.stdout == (expected + "\n" if expected else "")


def _saved(tmp_path, config):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind", ["gpt2", "falcon-alibi"])
def test_unsupported_architecture_one_line_exit_2(kind, tmp_path):
    from transformers import FalconConfig, GPT2Config

    if kind == "gpt2":
        config = GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    else:
        config = FalconConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True)
    path = _saved(tmp_path / "m", config)
    doc = tmp_path / "doc.txt"
    doc.write_text("hello there")
    r = runner.invoke(app, ["continue", str(doc), "--model", str(path), "-n", "2"])
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf: error: "), r.stderr
    assert "not supported" in lines[0] and "llama" in lines[0] and "bloom" in lines[0]
