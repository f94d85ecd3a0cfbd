"""`lminf bench`: the unmodified model and LM-Infinite side by side."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UsageError
from ..units import format_length, human_bytes, parse_lengths
from .options import SETTINGS_FIELDS, EngineOptions, LminfCommand, with_options
from .output import cli_errors, note, status, write_stdout


@with_options(EngineOptions, "opts")
def bench(
    length: Annotated[str, typer.Option("--length", "-l", help="Input length(s): 4096, 32k, 128K, 1M; "
                                        "comma-separated for several.")] = "32k",
    decode_tokens: Annotated[int, typer.Option(help="Tokens to decode after the encode.")] = 64,
    text: Annotated[Optional[str], typer.Option(help="Take input tokens from this text file "
                                                "[default: Shakespeare if installed, else seeded random ids].")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline",
                                           help="Also run the unmodified model.")] = True,
    baseline_timeout: Annotated[float, typer.Option(help="Seconds before a baseline run is stopped.")] = 3600,
    baseline_dtype: Annotated[str, typer.Option(
        help="Precision of the unmodified baseline: auto (float32 on the CPU, bfloat16 on GPU, plus a second "
        "baseline at lminf's --dtype/--quantize when that differs, so both ratios are shown), same (only at "
        "lminf's), or float32, bfloat16, float16.")] = "auto",
    arch: Annotated[Optional[str], typer.Option(help="Known architecture shape (llama-2-7b, llama-3-8b, "
                                                "mistral-7b, smollm2-135m); needs --random-weights.")] = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Build --arch from its config "
                                                 "with random weights (no download).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG of time and memory against length.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the --plot file if it exists (never --text).")]
    = False,
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Measure encode/decode speed and memory: unmodified model vs LM-Infinite."""
    from ..bench import BASELINE_DTYPES, BenchSpec, ratios, run_bench

    with cli_errors():
        lengths = parse_lengths(length)
        requested = opts.requested()
        if decode_tokens < 0:
            raise UsageError(f"--decode-tokens must be >= 0, got {decode_tokens}")
        if baseline_timeout <= 0:
            raise UsageError(f"--baseline-timeout must be positive, got {baseline_timeout}")
        if baseline_dtype not in BASELINE_DTYPES:
            raise UsageError(f"unknown --baseline-dtype '{baseline_dtype}' (use {', '.join(BASELINE_DTYPES)})")
        if (arch is None) != (not random_weights):
            raise UsageError("--arch and --random-weights go together (shapes without weights)")
        if arch and opts.model:
            raise UsageError("give either --model or --arch, not both")
        if arch:
            from ..bench import ARCHS
            if arch not in ARCHS:
                raise UsageError(f"unknown --arch '{arch}'; known: {', '.join(ARCHS)}")
        if text is not None:
            from ..documents import read_document
            read_document(text)  # fail now, not inside every child
        if plot:
            from ..eval.plots import check_plotting
            from ..outputs import check_destination

            check_plotting()
            check_destination(plot, overwrite=force, inputs=[text] if text else [])  # before the runs
        spec = BenchSpec(variant="lminf", length=lengths[0], decode_tokens=decode_tokens, model=opts.model,
                         arch=arch, device=opts.device, dtype=opts.dtype, quantize=opts.quantize,
                         device_map=opts.device_map, max_memory=opts.max_memory, load_in=opts.load_in, text=text,
                         requested={k: requested[k] for k in SETTINGS_FIELDS})
        console = Console(stderr=True)

        def started(variant: str, n: int) -> None:
            if not opts.quiet:
                console.print(f"[dim]running {variant} at {format_length(n)} tokens…[/dim]", highlight=False)

        with status("Benchmarking", opts.quiet):
            results = run_bench(spec, lengths, baseline=baseline, baseline_timeout=baseline_timeout,
                                on_start=started, baseline_dtype=baseline_dtype)
        summary, same = ratios(results), ratios(results, against="baseline-same")
        if as_json:
            payload = {"results": [dataclasses.asdict(r) for r in results],
                       "ratios": {str(k): v for k, v in summary.items()}}
            if same:
                payload["ratios_same_precision"] = {str(k): v for k, v in same.items()}
            write_stdout(json.dumps(payload, indent=2) + "\n")
        else:
            out = Console()
            if not out.is_terminal:
                out = Console(width=200)  # files and pipes get the whole table, unwrapped
            out.print(render_table(results, summary, same))
        if plot:
            from ..eval.plots import plot_bench

            plot_bench(results, plot)
        failed = [r for r in results if r.status == "error"]
        for r in failed:
            note(f"{r.variant} at {format_length(r.length)} failed: {r.message}")  # escaped: may quote a file
        if results and all(r.status == "error" for r in results):
            raise typer.Exit(1)


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return human_bytes(value)
    if kind == "s":
        return f"{value:,.1f}"
    if kind == "ms":
        return f"{value:,.1f}"
    if kind == "tps":
        return f"{value:,.1f}"
    if kind == "bw":
        return f"{value / 1e9:,.1f}"
    return str(value)


def render_table(results, summary, same=None) -> Table:
    """The side-by-side table; OOM/timeout cells say so instead of numbers.  `same`: ratios
    against the baseline at lminf's precision, a second speedup row per length."""
    table = Table(title="lminf bench", title_justify="left")
    for col in ("length", "variant", "precision", "encode s", "encode tok/s", "decode tok/s", "step ms (median)",
                "peak mem", "beyond weights", "KV cache", "middle store", "decode GB/s"):
        table.add_column(col, justify="left" if col in ("length", "variant", "precision") else "right")
    for r in results:
        if r.status != "ok":
            label = {"oom": "OOM", "timeout": "timeout"}.get(r.status, "error")
            table.add_row(format_length(r.length), r.variant, r.precision or "-", label, label, label,
                          "-", "-", "-", "-", "-", "-")
            continue
        bw = _fmt(r.bandwidth_bytes_per_s, "bw")
        if r.bandwidth_fraction is not None:
            bw += f" ({r.bandwidth_fraction:.0%})"
        table.add_row(format_length(r.length), r.variant, r.precision or "-", _fmt(r.encode_seconds, "s"),
                      _fmt(r.encode_tps, "tps"), _fmt(r.decode_tps, "tps"), _fmt(r.median_step_ms, "ms"),
                      _fmt(r.peak_memory_bytes, "bytes"), _fmt(r.peak_beyond_weights_bytes, "bytes"),
                      _fmt(r.kv_cache_bytes, "bytes"), _fmt(r.extra.get("middle_store_bytes") or None, "bytes"), bw)

    def x(v):
        return f"{v:.2f}x" if v else "-"

    for label, rows in (("speedup", summary), ("speedup, same precision", same or {})):
        for length, s in rows.items():
            table.add_row(format_length(length), f"[bold]{label}[/bold]", "", x(s["encode_speedup"]), "",
                          x(s["decode_speedup"]), "", x(s["memory_saving"]), x(s["memory_saving_beyond_weights"]),
                          "", "", "")
    return table


def register(app: typer.Typer) -> None:
    """Attach `lminf bench`."""
    app.command("bench", cls=LminfCommand)(bench)
