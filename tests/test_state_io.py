"""The `.lminf` file format: a header checked field by field, tensors checked against the model.

State files are untrusted input: each crafted file below must be refused with one
InputError (or UsageError) line, before anything is allocated from its numbers.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CORPUS
from safetensors import safe_open
from safetensors.torch import save_file

from lminf_cli.documents import Document
from lminf_cli.errors import InputError, LminfError, UsageError
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.prompts import PromptFormat
from lminf_cli.settings import LambdaSettings
from lminf_cli.state_io import StateHeader, load_state, read_header, save_state
from lminf_cli.tasks import encode_document

SETTINGS = LambdaSettings(n_global=4, n_local=32, limit_distance=64, chunk_size=16, middle_top_k=3,
                          middle_from_layer=1)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(load_model(str(tiny_model_dir), device="cpu", dtype="float32"), SETTINGS)


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory):
    encoded = encode_document(engine, Document("doc.txt", CORPUS), "tiny", notes=True, section_tokens=60,
                              note_tokens=4)
    path = tmp_path_factory.mktemp("state") / "doc.lminf"
    save_state(path, encoded.state, encoded.header)
    return path, encoded


def rewrite(src, dst, header=None, meta=None, tensors=None):
    """A copy of state file `src` with its header JSON (a dict, or raw text), metadata or tensors changed."""
    with safe_open(str(src), framework="pt") as f:
        old_meta = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    if header is not None:
        old_meta["header"] = header if isinstance(header, str) else json.dumps(header)
    old_meta.update(meta or {})
    old.update(tensors or {})
    save_file(old, str(dst), metadata=old_meta)
    return dst


def header_dict(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["header"])


def test_round_trip_of_header_and_state(engine, saved):
    path, encoded = saved
    header = read_header(path)
    assert header == encoded.header
    assert StateHeader.from_dict(json.loads(header.to_json()), "x") == header
    assert header.settings == engine.settings and header.length == encoded.state.cache.length
    state = load_state(path, engine, header, PromptFormat.for_tokenizer(engine.lm.tokenizer).fingerprint)
    assert state.cache.meta_state() == encoded.state.cache.meta_state()
    assert all(torch.equal(a, b) for a, b in zip(state.cache.state_dict().values(),
                                                 encoded.state.cache.state_dict().values(), strict=True))
    assert torch.equal(state.logits, encoded.state.logits)


def _with(d: dict, path: tuple, value) -> dict:
    out = json.loads(json.dumps(d))
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()
HEADER_CASES = {
    "notes not a list": (("notes",), 5, "notes"),
    "a note not a string": (("notes",), ["ok", 3], "notes"),
    "n_local a string": (("settings", "n_local"), "8192", "n_local"),
    "n_local a bool": (("settings", "n_local"), True, "n_local"),
    "n_local negative": (("settings", "n_local"), -4, "n_local"),
    "n_local past the cap": (("settings", "n_local"), 10 ** 9, "n_local"),
    "unknown setting": (("settings", "evil"), 1, "evil"),
    "missing setting": (("settings", "n_global"), _DELETE, "n_global"),
    "length 2^62": (("cache", "length"), 2 ** 62, "length"),
    "rebases -3": (("cache", "rebases"), -3, "rebases"),
    "counters missing": (("cache", "base"), _DELETE, "cache"),
    "document tokens beyond the stream": (("document_tokens",), 10 ** 6, "document tokens"),
    "pages a float": (("document_pages",), 1.5, "document_pages"),
    "unknown field": (("model_spec_2",), "x", "unknown"),
    "missing field": (("model_fingerprint",), _DELETE, "missing"),
    "dtype": (("dtype",), "float64", "dtype"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_crafted_header_fields_are_refused_when_read(saved, tmp_path, case):
    path, _ = saved
    where, value, words = HEADER_CASES[case]
    bad = rewrite(path, tmp_path / "bad.lminf", header=_with(header_dict(path), where, value))
    with pytest.raises(InputError, match=words):
        read_header(bad)


@pytest.mark.parametrize("text,words", [
    ("[" * 100_000 + "]" * 100_000, "damaged"),  # nested far past Python's recursion limit
    ("{not json", "damaged"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"notes": ["x" * (5 << 20)]}), "MiB"),
])
def test_malformed_header_json_is_refused(saved, tmp_path, text, words):
    bad = rewrite(saved[0], tmp_path / "bad.lminf", header=text)
    with pytest.raises(InputError, match=words):
        read_header(bad)


def test_other_formats_and_versions_are_refused(saved, tmp_path):
    old = rewrite(saved[0], tmp_path / "v1.lminf", meta={"version": "1"})
    with pytest.raises(InputError, match="encode the document again"):
        read_header(old)
    other = rewrite(saved[0], tmp_path / "other.lminf", meta={"format": "something-else"})
    with pytest.raises(InputError, match="not an lminf state"):
        read_header(other)


def load(engine, path):
    return load_state(path, engine, read_header(path), PromptFormat.for_tokenizer(engine.lm.tokenizer).fingerprint)


def test_consistent_looking_but_tampered_counters_are_refused_on_load(engine, saved, tmp_path):
    path, _ = saved
    h = header_dict(path)
    for counters in ({"length": h["cache"]["length"], "base": 0, "rebases": 5},
                     {"length": h["cache"]["length"] + 10 ** 6, "base": 0, "rebases": 0}):
        bad = rewrite(path, tmp_path / "bad.lminf", header=_with(h, ("cache",), counters))
        with pytest.raises(InputError, match="counters"):
            load(engine, bad)


def test_a_cache_too_large_for_memory_is_refused_before_allocating(engine, saved, tmp_path):
    path, _ = saved
    h = header_dict(path)
    huge = _with(_with(h, ("settings", "n_local"), 10 ** 9), ("settings", "limit_distance"), 10 ** 9)
    bad = rewrite(path, tmp_path / "huge.lminf", header=huge)
    header = read_header(bad)  # a valid header, just an impossible size
    with pytest.raises(UsageError, match="memory is free"):
        load_state(bad, Engine(engine.lm, header.settings), header,
                   PromptFormat.for_tokenizer(engine.lm.tokenizer).fingerprint)


def test_tensors_that_do_not_match_the_header_are_refused(engine, saved, tmp_path):
    path, encoded = saved
    with safe_open(str(path), framework="pt") as f:
        ring = f.get_tensor("layers.0.k_ring")
        logits = f.get_tensor("logits")
    for name, tensors in {"half ring": {"layers.0.k_ring": ring.half()},
                          "short logits": {"logits": logits[:-1]},
                          "extra": {"layers.9.k_ring": ring}}.items():
        bad = rewrite(path, tmp_path / f"{name}.lminf", tensors=tensors)
        with pytest.raises(LminfError):
            load(engine, bad)
