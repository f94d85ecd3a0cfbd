"""A model split by a device map (layers offloaded to disk and host memory) computes what the whole model does."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer
from typer.testing import CliRunner

from lminf_cli.cli.app import app
from lminf_cli.errors import SettingsError
from lminf_cli.generate import Engine
from lminf_cli.models import load_model, parse_device_map, parse_max_memory
from lminf_cli.settings import LambdaSettings

# Layers 1 and 3 and the head are read from disk for each forward; the rest stay in host memory.
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "disk"}
SETTINGS = LambdaSettings(n_global=4, n_local=16, limit_distance=16, chunk_size=8)


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_tokenizer()
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    path = tmp_path_factory.mktemp("four-layers")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _logits(lm, ids):
    engine = Engine(lm, SETTINGS)
    cache = engine.new_cache()
    parts = [engine.forward(cache, ids[:, s:s + 8], rows=slice(None)) for s in range(0, ids.shape[1], 8)]
    return torch.cat(parts, dim=1), cache


def test_split_model_gives_the_same_logits_and_tokens(four_layer_dir):
    whole = load_model(str(four_layer_dir), device="cpu")
    split = load_model(str(four_layer_dir), device="cpu", device_map=json.dumps(SPLIT))
    assert split.model.hf_device_map == SPLIT
    offloaded = [n for n, p in split.model.named_parameters() if p.device.type == "meta"]
    assert any("layers.1." in n for n in offloaded) and any("lm_head" in n for n in offloaded)
    assert split.device == torch.device("cpu") and split.fingerprint == whole.fingerprint
    ids = torch.randint(0, len(whole.tokenizer), (1, 60), generator=torch.Generator().manual_seed(1))
    want, _ = _logits(whole, ids)
    got, cache = _logits(split, ids)  # 60 tokens: well beyond the 16-token window, so the Λ rule is in play
    assert all(lc.device == torch.device("cpu") for lc in cache.layers)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    streams = []
    for lm in (whole, split):
        engine = Engine(lm, SETTINGS)
        streams.append(list(engine.generate_ids(engine.encode(ids[0].tolist()), 20, stop_ids=[])))
    assert streams[0] == streams[1]


def test_device_map_through_the_cli(four_layer_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("It was the best of times, it was the worst of times. " * 10)
    (tmp_path / "map.json").write_text(json.dumps(SPLIT))
    base = ["continue", str(doc), "--model", str(four_layer_dir), "-n", "12", "--temperature", "0", "--n-local", "16",
            "--device", "cpu"]
    runner = CliRunner()
    whole = runner.invoke(app, base)
    split = runner.invoke(app, [*base, "--device-map", str(tmp_path / "map.json")])
    capped = runner.invoke(app, [*base, "--max-memory", "cpu=1GiB"])
    assert whole.exit_code == split.exit_code == capped.exit_code == 0, (split.stderr, capped.stderr)
    assert whole.stdout == split.stdout == capped.stdout and whole.stdout.strip()


@pytest.mark.parametrize("args,expect", [
    (["--device-map", "everywhere"], "--device-map must be auto"),
    (["--device-map", "{not json"], "--device-map cannot be read"),
    (["--max-memory", "cpu"], "--max-memory expects DEVICE=SIZE"),
    (["--max-memory", "gpu0=3GiB"], "--max-memory device 'gpu0'"),
    (["--max-memory", "0=lots"], "--max-memory cannot read 'lots'"),
    (["--load-in", "3bit"], "--load-in must be 4bit or 8bit"),
    (["--load-in", "4bit", "--device", "cpu"], "--load-in quantizes through bitsandbytes on a CUDA GPU"),
])
def test_bad_placement_is_one_line(args, expect, tiny_model_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello there")
    r = CliRunner().invoke(app, ["continue", str(doc), "--model", str(tiny_model_dir), *args])
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf: error: " + expect), r.stderr


def test_placement_parsing():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    assert parse_max_memory("0=20GiB, cuda:1=10GB ,cpu=64GiB") == {0: "20GiB", 1: "10GB", "cpu": "64GiB"}
    with pytest.raises(SettingsError):
        parse_device_map("[]")
