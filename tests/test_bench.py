"""`lminf bench`: lengths, table and JSON on a tiny model, failure cells, architecture shapes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lminf_cli.bench import (
    PUBLISHED_PARAMS,
    BenchSpec,
    RunResult,
    arch_config,
    classify_failure,
    count_parameters,
    ratios,
    run_bench,
    variant_specs,
)
from lminf_cli.cli.app import app
from lminf_cli.cli.bench import render_table
from lminf_cli.errors import UsageError
from lminf_cli.units import format_length, parse_length, parse_lengths

runner = CliRunner()


@pytest.mark.parametrize("text,value", [("4096", 4096), ("32k", 32768), ("128K", 131072), ("1M", 1048576),
                                        (" 8k ", 8192), ("1.5k", 1536)])
def test_parse_length(text, value):
    assert parse_length(text) == value


@pytest.mark.parametrize("text", ["", "k", "-4k", "0", "32q", "1.3", "4 k k", "1e3"])
def test_parse_length_rejects(text):
    with pytest.raises(UsageError):
        parse_length(text)


def test_parse_lengths_and_human():
    assert parse_lengths("8k,32k,8k,128k") == [8192, 32768, 131072]
    assert [format_length(n) for n in (8192, 1048576, 1000)] == ["8k", "1M", "1000"]
    with pytest.raises(UsageError):
        parse_lengths(",")


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMS))
def test_random_weight_shapes_match_published_parameter_counts(arch):
    assert abs(count_parameters(arch) / PUBLISHED_PARAMS[arch] - 1) < 0.01
    assert arch_config(arch).max_position_embeddings >= 4096


def test_bench_json_and_table_on_tiny_model(tiny_model_dir):
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--length", "96,160", "--decode-tokens", "4",
                            "--n-local", "32", "--n-global", "4", "--chunk-size", "32", "--json", "--quiet"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    rows = data["results"]
    assert [(x["variant"], x["length"]) for x in rows] == [("baseline", 96), ("lminf", 96),
                                                           ("baseline", 160), ("lminf", 160)]
    for x in rows:
        assert x["status"] == "ok"
        assert x["encode_seconds"] > 0 and x["decode_tps"] > 0 and x["peak_memory_bytes"] > 0
    lminf = [x for x in rows if x["variant"] == "lminf"]
    # Constant memory: the Λ cache is the same size at both lengths ...
    assert lminf[0]["kv_cache_bytes"] == lminf[1]["kv_cache_bytes"]
    # ... while the unmodified model's cache grows with the input.
    base = [x for x in rows if x["variant"] == "baseline"]
    assert base[1]["kv_cache_bytes"] > base[0]["kv_cache_bytes"]
    assert set(data["ratios"]) == {"96", "160"}
    table = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--length", "64", "--decode-tokens", "2",
                                "--no-baseline", "--quiet"])
    assert table.exit_code == 0 and "lminf" in table.stdout and "baseline" not in table.stdout
    # The retrieval recipe reaches the engine: half-L window, top-k 5, a middle store that is reported.
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--length", "160", "--decode-tokens", "2",
                            "--no-baseline", "--retrieval", "--middle-from-layer", "0", "--json", "--quiet"])
    assert r.exit_code == 0, r.stderr
    extra = json.loads(r.stdout)["results"][0]["extra"]
    s = extra["settings"]
    assert (s["n_local"], s["limit_distance"], s["middle_top_k"]) == (32, 32, 5)
    assert extra["middle_store_bytes"] > 0


def test_failed_cells_are_reported_and_the_run_goes_on():
    calls = []

    def fake_runner(spec: BenchSpec, timeout):
        calls.append((spec.variant, spec.length, timeout))
        if spec.variant == "baseline" and spec.length == 64:
            return RunResult("baseline", 64, status="oom", message="out of memory")
        if spec.variant == "baseline":
            return RunResult("baseline", spec.length, status="timeout", message="over 5 s")
        return RunResult("lminf", spec.length, encode_seconds=1.0, encode_tps=spec.length, decode_tps=10.0,
                         median_step_ms=100.0, peak_memory_bytes=10, peak_beyond_weights_bytes=5)

    results = run_bench(BenchSpec("lminf", 0), [64, 128], baseline_timeout=5, runner=fake_runner)
    assert calls == [("baseline", 64, 5), ("lminf", 64, None), ("baseline", 128, 5), ("lminf", 128, None)]
    assert [r.status for r in results] == ["oom", "ok", "timeout", "ok"]
    assert ratios(results) == {}
    from rich.console import Console
    console = Console(width=200, record=True)
    console.print(render_table(results, ratios(results)))
    text = console.export_text()
    assert "OOM" in text and "timeout" in text


def test_real_timeout_path(tiny_model_dir):
    from lminf_cli.bench import run_in_child
    r = run_in_child(BenchSpec("baseline", 64, decode_tokens=2, model=str(tiny_model_dir)), timeout=0.05)
    assert r.status == "timeout"


def test_classify_failure():
    assert classify_failure(-9, "")[0] == "oom"
    assert classify_failure(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")[0] == "oom"
    assert classify_failure(1, "Traceback...\nValueError: bad")[0] == "error"


@pytest.mark.parametrize("args", [["--length", "lots"], ["--length", "0"], ["--decode-tokens", "-1"],
                                  ["--arch", "llama-2-7b"], ["--random-weights"],
                                  ["--arch", "gpt-5", "--random-weights"], ["--n-local", "0"],
                                  ["--baseline-timeout", "0"], ["--text", "/no/such/file"],
                                  ["--baseline-dtype", "int4"], ["--quantize", "int3"],
                                  ["--quantize", "int8", "--device", "cuda"], ["--kv-quantize", "int3"],
                                  ["--kv-quantize", "int8", "--device", "cuda"]])
def test_bad_options_one_line_exit_2(args):
    r = runner.invoke(app, ["bench", *args])
    assert r.exit_code == 2, r.stdout
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("lminf: error: ")


def _precisions(specs):
    return [(s.variant, s.dtype, s.quantize) for s in specs]


def test_baseline_keeps_float32_and_is_also_run_at_lminfs_precision(monkeypatch):
    from lminf_cli import bench, kernels

    monkeypatch.setattr(kernels, "cpu_bf16_feature", lambda: "amx_bf16")  # auto -> bfloat16 here
    base = BenchSpec("lminf", 0, device="cpu")
    assert _precisions(variant_specs(base)) == [("baseline", "float32", "none"),
                                                ("baseline-same", "bfloat16", "none"), ("lminf", "bfloat16", "none")]
    q = BenchSpec("lminf", 0, device="cpu", quantize="int4")
    assert _precisions(variant_specs(q)) == [("baseline", "float32", "none"),
                                             ("baseline-same", "bfloat16", "int4"), ("lminf", "bfloat16", "int4")]
    assert _precisions(variant_specs(q, baseline_dtype="same")) == [("baseline", "bfloat16", "int4"),
                                                                    ("lminf", "bfloat16", "int4")]
    assert _precisions(variant_specs(q, baseline_dtype="float16"))[0] == ("baseline", "float16", "none")
    assert _precisions(variant_specs(q, baseline=False)) == [("lminf", "bfloat16", "int4")]
    # Where lminf computes in float32 too, one baseline is enough.
    f32 = BenchSpec("lminf", 0, device="cpu", dtype="float32")
    assert _precisions(variant_specs(f32)) == [("baseline", "float32", "none"), ("lminf", "float32", "none")]
    with pytest.raises(UsageError, match="--baseline-dtype"):
        variant_specs(base, baseline_dtype="int4")
    # On a GPU the reference stays bfloat16, as the unmodified model runs there.
    monkeypatch.setattr(bench, "pick_device", lambda device: __import__("torch").device("cuda"))
    assert _precisions(variant_specs(BenchSpec("lminf", 0))) == [("baseline", "bfloat16", "none"),
                                                                 ("lminf", "bfloat16", "none")]
    with pytest.raises(UsageError, match="CPU only"):
        variant_specs(BenchSpec("lminf", 0, requested={"kv_quantize": "int8"}))


def test_bench_reports_both_baselines_when_quantized(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMINF_CACHE", str(tmp_path))
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--length", "96", "--decode-tokens", "3",
                            "--n-local", "32", "--n-global", "4", "--chunk-size", "32", "--dtype", "bfloat16",
                            "--quantize", "int8", "--json", "--quiet"])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    rows = data["results"]
    assert [(x["variant"], x["precision"], x["status"]) for x in rows] == [
        ("baseline", "float32", "ok"), ("baseline-same", "bfloat16+int8", "ok"), ("lminf", "bfloat16+int8", "ok")]
    assert set(data["ratios"]) == set(data["ratios_same_precision"]) == {"96"}
    # The quantized runs hold the packed copies beside the dense bfloat16 weights: more than half of float32's.
    assert rows[0]["weight_bytes"] / 2 < rows[2]["weight_bytes"] < rows[0]["weight_bytes"]
    text = render_table([RunResult(**x) for x in rows], ratios([RunResult(**x) for x in rows]),
                        ratios([RunResult(**x) for x in rows], against="baseline-same"))
    from rich.console import Console
    console = Console(width=250, record=True)
    console.print(text)
    out = console.export_text()
    assert "speedup, same precision" in out and "bfloat16+int8" in out
