"""`lminf eval ppl` and `lminf eval passkey`: length generalisation on the user's model and text."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Optional

import typer

from ..errors import UsageError
from ..outputs import check_destination
from ..passages import DEFAULT_REREAD, REREAD_BY
from .options import ATTENTION_NEEDS_KV, RETRIEVAL, EngineOptions, HelpGroup, LminfCommand, check_positive, with_options
from .output import cli_errors, note, printable, stdout_console, task_progress, write_stdout

eval_app = typer.Typer(cls=HelpGroup, no_args_is_help=True, rich_markup_mode="rich",
                       help="Measure length generalisation: perplexity by position, passkey retrieval, needles "
                       "in your own text, summary coverage.")

BaselineMaxOpt = Annotated[Optional[str], typer.Option(
    "--baseline-max-length", help="Stop the unmodified model after this many tokens (e.g. 32k).")]
BaselineTimeOpt = Annotated[Optional[float], typer.Option(
    "--baseline-time", help="Stop the unmodified model after this many seconds.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")]
PlotOpt = Annotated[Optional[str], typer.Option("--plot", help="Also save a PNG chart to this path.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the --plot file if it exists (never an input).")]
NoLminfOpt = Annotated[bool, typer.Option(
    "--no-lminf", help="Run only the baseline(s), e.g. to spread a long evaluation over processes.")]


def register(app: typer.Typer) -> None:
    """Attach the `eval` command group."""
    app.add_typer(eval_app, name="eval")


SPARK_WIDTH = 100


def _shown(name: Any) -> str:
    """A file or model name inside a rich table title: control characters and markup escaped."""
    from rich.markup import escape

    return escape(printable(str(name), keep_layout=False))


def _budget(max_length: str | None, seconds: float | None):
    from ..eval.baseline import Budget
    from ..units import parse_length

    if seconds is not None and not seconds > 0:
        raise UsageError(f"--baseline-time must be a positive number of seconds, got {seconds}")
    limit = parse_length(max_length, "--baseline-max-length") if max_length is not None else None
    return Budget(seconds=seconds, max_tokens=limit)


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


@eval_app.command("ppl", cls=LminfCommand)
@with_options(EngineOptions, "opts", exclude=RETRIEVAL)  # scoring never retrieves
def ppl(
    file: Annotated[str, typer.Argument(help="Text or PDF file, or - for stdin.")],
    max_length: Annotated[str, typer.Option("--max-length", help="Tokens to score (e.g. 32k, 128k).")] = "128k",
    bucket: Annotated[str, typer.Option("--bucket", help="Positions per reported bucket (e.g. 1k).")] = "1k",
    baseline: Annotated[Optional[list[str]], typer.Option(
        "--baseline", help="Also score with the unmodified model: 'vanilla' (dense, as far as it fits) or "
        "'window' (re-reading only the last L tokens before each bucket). Repeat for both.")] = None,
    baseline_max_length: BaselineMaxOpt = None,
    baseline_time: BaselineTimeOpt = None,
    window_stride: Annotated[Optional[str], typer.Option(
        "--window-stride", help="Window baseline: tokens scored per fresh read of L tokens "
        "[default: --bucket, at most L/2].")] = None,
    streams: Annotated[int, typer.Option(
        "--streams", help="Score this many consecutive stretches of the file, each --max-length tokens, and "
        "average NLL by position: the text's own ups and downs average out, effects of position stay.")] = 1,
    offset: Annotated[str, typer.Option(
        "--offset", help="Skip this many tokens of the file first (e.g. 128k: score a later stretch).")] = "0",
    no_lminf: NoLminfOpt = False,
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Mean NLL and perplexity by position bucket, with LM-Infinite and optional baselines."""
    from ..documents import read_document
    from ..eval import baseline as bl
    from ..eval import plots as pl
    from ..eval import ppl as pp
    from ..units import parse_length

    with cli_errors():
        n_max = parse_length(max_length, "--max-length")
        size = parse_length(bucket, "--bucket")
        baselines = list(dict.fromkeys(baseline or []))
        for b in baselines:
            if b not in bl.BASELINES:
                raise UsageError(f"--baseline must be one of {', '.join(bl.BASELINES)}, got '{b}'")
        budget = _budget(baseline_max_length, baseline_time)
        stride = parse_length(window_stride, "--window-stride") if window_stride is not None else None
        if no_lminf and not baselines:
            raise UsageError("--no-lminf needs at least one --baseline")
        skip = parse_length(offset, "--offset", allow_zero=True)
        pp.check_streams(streams)
        if plot:
            pl.check_plotting()
            check_destination(plot, overwrite=force, inputs=[file])  # before the run, never the document
        doc = read_document(file)
        from ..tasks import engine_for

        engine = engine_for(opts.load(), opts.requested())
        lm = engine.lm
        ids = pp.tokenize_prefix(lm.tokenizer, doc.text, skip + streams * n_max)
        ids = pp.skip_tokens(ids, skip, doc.name)
        pp.check_file_long_enough(len(ids), size, doc.name)
        parts = pp.split_streams(ids, streams, n_max, doc.name)
        L = engine.adapter.trained_length
        stride = stride or min(size, max(1, L // 2))
        if bl.WINDOW in baselines and not stride < L:
            raise UsageError(f"--window-stride must be smaller than the trained length ({L:,}), got {stride:,}")

        def over_streams(name: str, score) -> bl.Scored:
            """One method over every stream (progress and stop notices per stream), averaged by position."""
            per_stream = []
            for i, part in enumerate(parts):
                label = name if streams == 1 else f"{name}, stream {i + 1}/{streams}"
                with task_progress(opts.quiet, label) as progress:
                    run = score(part, progress)
                if run.stop_reason:
                    note(f"{label} stopped at {run.tokens_read:,} of {len(part):,} tokens: {run.stop_reason}")
                per_stream.append(run)
            return pp.average_streams(per_stream)

        runs = []
        if not no_lminf:
            runs.append(over_streams("LM-Infinite", lambda part, progress: pp.lminf_nll(engine, part, progress)))
        dense = bl.DenseModel(lm, budget=budget) if baselines else None
        for b in baselines:
            if b == bl.VANILLA:
                runs.append(over_streams(bl.METHOD_LABELS[b], dense.nll))
            else:
                runs.append(over_streams(bl.METHOD_LABELS[b], lambda part, progress: dense.window_nll(
                    part, window=L, stride=stride, progress=progress)))

        meta = {"model": lm.name, "file": doc.name, "streams": streams, "offset": skip,
                "window_stride": stride if bl.WINDOW in baselines else None, "device": str(lm.device),
                "dtype": str(lm.dtype).replace("torch.", ""), "quantize": lm.quantize,
                "settings": engine.settings.to_dict()}
        report = pp.ppl_report(runs, size, L, meta)
        if plot:
            pl.plot_nll(report, plot)
        if json_out:
            write_stdout(json.dumps(report, indent=1) + "\n")
        else:
            _print_ppl(report, sparkline=not plot)


def _print_ppl(report: dict[str, Any], sparkline: bool) -> None:
    from rich.table import Table

    from ..eval import baseline as bl
    from ..eval import ppl as pp
    from ..units import format_length

    methods = report["methods"]
    streams = report.get("streams", 1)
    what = f"{report['tokens']:,} tokens" if streams == 1 else \
        f"mean of {streams} streams of {report['tokens']:,} tokens"
    table = Table(title=f"NLL by position: {_shown(report['file'])} ({what}, {_shown(report['model'])})",
                  title_justify="left")
    table.add_column("positions", justify="right")
    table.add_column("tokens", justify="right")
    for m in methods.values():
        table.add_column(f"{m['label']} NLL", justify="right")
        table.add_column("ppl", justify="right")
    L = report["trained_length"]
    n_buckets = len(next(iter(methods.values()))["buckets"])
    for i in range(n_buckets):
        first = next(iter(methods.values()))["buckets"][i]
        row = [f"{format_length(first['start'])}-{format_length(first['end'])}",
               f"{max(m['buckets'][i]['tokens'] for m in methods.values()):,}"]
        for m in methods.values():
            b = m["buckets"][i]
            row += [_fmt(b["nll"]), _fmt(b["ppl"], 1)] if b["tokens"] else ["-", "-"]
        table.add_row(*row, end_section=first["end"] == L)
    mean_row = ["all", ""]
    for m in methods.values():
        mean_row += [_fmt(m["mean_nll"]), _fmt(math.exp(m["mean_nll"]), 1) if not math.isnan(m["mean_nll"]) else "-"]
    table.add_section()
    table.add_row(*mean_row, style="bold")
    console = stdout_console()
    console.print(table)

    lines = []
    flat = report["summary"].get("flatness")
    if flat:
        ref = flat["reference"]
        lines.append(f"LM-Infinite: mean NLL {ref['nll']:.3f} over positions {format_length(ref['start'])}-"
                     f"{format_length(ref['end'])}; every {format_length(L // 2)}-token span after it within "
                     f"{flat['max_deviation']:.3f} nats of that.")
    for base in bl.BASELINES:
        cmp_ = report["summary"].get(f"past_trained_length_vs_{base}")
        if cmp_:
            lines.append(f"Past the trained length ({format_length(cmp_['start'])}-{format_length(cmp_['end'])}): "
                         f"LM-Infinite {cmp_[bl.LMINF]:.3f} vs {bl.METHOD_LABELS[base]} {cmp_[base]:.3f} mean NLL.")
    for m in methods.values():
        if m["stop_reason"]:
            lines.append(f"{m['label']} stopped at {m['stopped_at']:,} tokens: {m['stop_reason']}.")
    if sparkline:
        vals = [b["nll"] for m in methods.values() for b in m["buckets"] if b["tokens"]]
        lo, hi = min(vals), max(vals)
        width = max(len(m["label"]) for m in methods.values())
        lines.append(f"NLL by position ({lo:.2f} to {hi:.2f} nats, one mark per "
                     f"{format_length(report['bucket'])} or more; | = trained length):")
        for m in methods.values():
            vals_m = [b["nll"] if b["tokens"] else float("nan") for b in m["buckets"]]
            spark = pp.sparkline(vals_m, lo, hi, width=SPARK_WIDTH)
            per_mark = max(1, math.ceil(len(vals_m) / SPARK_WIDTH))  # buckets averaged into one mark
            cut = min(len(spark), math.ceil(L / report["bucket"] / per_mark))
            lines.append(f"  {m['label']:<{width}} {spark[:cut]}|{spark[cut:]}")
    for line in lines:
        console.print(line, highlight=False, markup=False)


@eval_app.command("passkey", cls=LminfCommand)
@with_options(EngineOptions, "opts")
def passkey(
    lengths: Annotated[str, typer.Option("--lengths", help="Prompt lengths in tokens.")] = "4k,8k,16k,32k",
    depths: Annotated[str, typer.Option("--depths", help="Where the key sits, 0 = start, 1 = end.")]
    = "0.1,0.3,0.5,0.7,0.9",
    samples: Annotated[int, typer.Option("--samples", help="Prompts (different keys) per cell.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the keys.")] = 0,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also ask the unmodified model.")] = False,
    baseline_max_length: BaselineMaxOpt = None,
    baseline_time: BaselineTimeOpt = None,
    no_lminf: NoLminfOpt = False,
    template: Annotated[str, typer.Option(
        "--template", help="plain: the tokenizer's plain encoding; chat: the model's chat template.")] = "plain",
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Passkey retrieval (Mohtashami & Jaggi 2023): accuracy by prompt length and depth of the key."""
    from ..eval import baseline as bl
    from ..eval import passkey as pk
    from ..eval import plots as pl
    from ..units import parse_lengths

    with cli_errors():
        lens = parse_lengths(lengths, "--lengths")
        deps = pk.parse_depths(depths)
        if samples < 1:
            raise UsageError(f"--samples must be at least 1, got {samples}")
        if template not in pk.TEMPLATES:
            raise UsageError(f"--template must be one of {', '.join(pk.TEMPLATES)}, got '{template}'")
        budget = _budget(baseline_max_length, baseline_time)
        if no_lminf and not baseline:
            raise UsageError("--no-lminf needs --baseline")
        if plot:
            pl.check_plotting()
            check_destination(plot, overwrite=force)  # before the run: nothing written over without --force
        from ..tasks import engine_for

        engine = engine_for(opts.load(), opts.requested())
        lm = engine.lm
        prompts = [(i, pk.passkey_prompt(lm.tokenizer, n, d, pk.passkey_key(seed, n, d, i), template))
                   for n in lens for d in deps for i in range(samples)]
        report = pk.PasskeyReport(
            meta={"model": lm.name, "template": template, "samples": samples, "seed": seed,
                  "trained_length": engine.adapter.trained_length, "settings": engine.settings.to_dict()},
            lengths=lens, depths=deps)
        if not no_lminf:
            with task_progress(opts.quiet, "LM-Infinite") as progress:
                report.results += pk.run_passkey(bl.LMINF, prompts, lambda p: pk.lminf_answer(engine, p.ids),
                                                 progress)
        if baseline:
            dense = bl.DenseModel(lm, budget=budget)
            dense.start_clock()
            stops = engine.stop_ids()
            with task_progress(opts.quiet, "unmodified") as progress:
                base = pk.run_passkey(bl.VANILLA, prompts, lambda p: pk.dense_answer(dense, p.ids, stops), progress)
            skipped = [r for r in base if r.skipped]
            if skipped:
                note(f"unmodified model skipped {len(skipped)} of {len(base)} prompts "
                        f"(from {skipped[0].length:,} tokens): {skipped[0].skipped}")
            report.results += base
        if plot:
            pl.plot_passkey(report, plot)
        if json_out:
            write_stdout(json.dumps(report.to_json(), indent=1) + "\n")
        else:
            _print_passkey(report)


def _print_passkey(report) -> None:
    from ..eval import passkey as pk

    tokens: dict[int, list[int]] = {}
    for r in report.results:
        tokens.setdefault(r.length, []).append(r.tokens)
    _print_grid(pk.passkey_grid(report.results), report.lengths, report.depths, tokens,
                lambda label: f"Passkey accuracy, {label} ({_shown(report.meta['model'])}, "
                              f"{report.meta['template']} prompt)")


def _print_grid(grid: dict, lengths: list[int], columns: list, tokens: dict[int, list[int]], title) -> None:
    """One table per method: a row per length, a column per depth (or "all"), hits/asked in each cell."""
    from rich.table import Table

    from ..eval import baseline as bl
    from ..eval import passkey as pk
    from ..units import format_length

    console = stdout_console()
    for method, rows in grid.items():
        table = Table(title=title(bl.METHOD_LABELS[method]), title_justify="left")
        table.add_column("length", justify="right")
        table.add_column("tokens", justify="right")
        for d in columns:
            table.add_column(f"depth {d:g}" if isinstance(d, float) else str(d), justify="center")
        if len(columns) > 1:
            table.add_column("all", justify="center")
        for n in lengths:
            cells = [rows.get(n, {}).get(d, pk.Cell()) for d in columns]
            right, ran = sum(c.correct for c in cells), sum(c.total for c in cells)
            toks = tokens.get(n, [0])
            total = [f"{right / ran:.0%}" if ran else "skipped"] if len(columns) > 1 else []
            table.add_row(format_length(n), f"{round(sum(toks) / len(toks)):,}", *[_cell(c) for c in cells], *total)
        console.print(table)


def _cell(c) -> str:
    if c.total == 0:
        return "skipped" if c.skipped else "-"
    return f"{c.correct}/{c.total}"


@eval_app.command("needle", cls=LminfCommand)
@with_options(EngineOptions, "opts")
def needle(
    file: Annotated[str, typer.Argument(help="Real text to hide the facts in (text or PDF; - for stdin).")],
    lengths: Annotated[str, typer.Option("--lengths", help="Document lengths in tokens.")] = "4k,16k,32k",
    depths: Annotated[str, typer.Option("--depths", help="Where the fact sits, 0 = start, 1 = end "
                                        "(one needle per trial).")] = "0.1,0.3,0.5,0.7,0.9",
    fact: Annotated[Optional[str], typer.Option(
        "--needle", help="Your own fact sentence (with --question and --expect) [default: five built-in facts].")]
    = None,
    question: Annotated[Optional[str], typer.Option("--question", help="The question about --needle.")] = None,
    expect: Annotated[Optional[list[str]], typer.Option(
        "--expect", help="A string whose presence in the answer counts as a hit (repeat for alternatives).")] = None,
    needles: Annotated[int, typer.Option(
        "--needles", help="Facts planted in each document, at spread depths, each asked about: recall = the "
        "fraction found.")] = 1,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also ask the unmodified model.")] = False,
    lambda_alone: Annotated[bool, typer.Option(
        "--lambda-alone", help="Also ask with LM-Infinite's Λ-attention alone (no retrieval, the paper's "
        "window).")] = False,
    baseline_max_length: BaselineMaxOpt = None,
    baseline_time: BaselineTimeOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Longest answer.")] = 48,
    reread: Annotated[Optional[int], typer.Option(
        "--reread", show_default=False, help="As in ask: tokens of the passage a question is about, re-read before "
        f"it (0 = off) [default: {DEFAULT_REREAD}; 0 with --no-retrieval].")] = None,
    reread_by: Annotated[str, typer.Option("--reread-by", metavar="words|attention",
                                           help="As in ask: how that passage is found.")] = "words",
    json_out: JsonOpt = False,
    plot: PlotOpt = None,
    force: ForceOpt = False,
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Needle in a haystack on your own text: facts planted at depths, asked as `lminf ask` asks."""
    from ..documents import read_document
    from ..eval import baseline as bl
    from ..eval import needle as nd
    from ..eval import passkey as pk
    from ..eval import plots as pl
    from ..units import parse_lengths

    with cli_errors():
        lens = parse_lengths(lengths, "--lengths")
        deps = pk.parse_depths(depths)
        if (fact, question, expect) != (None, None, None) and not (fact and question and expect):
            raise UsageError("--needle, --question and --expect go together")
        facts = [nd.Needle(fact, question, tuple(expect))] if fact else list(nd.DEFAULT_NEEDLES)
        if needles < 1:
            raise UsageError(f"--needles must be at least 1, got {needles}")
        if max_new_tokens <= 0:
            raise UsageError(f"--max-new-tokens must be positive, got {max_new_tokens}")
        if (reread is not None and reread < 0) or reread_by not in REREAD_BY:
            raise UsageError(f"--reread must be 0 or more and --reread-by {' or '.join(REREAD_BY)}")
        from ..tasks import engine_for, reread_for

        reread = reread_for(opts.retrieval, reread)
        if reread and reread_by == "attention" and not (opts.retrieval or opts.middle_top_k):
            raise UsageError(ATTENTION_NEEDS_KV)
        plan = nd.trials(lens, deps, facts, needles)
        budget = _budget(baseline_max_length, baseline_time)
        requested = opts.requested()
        if plot:
            pl.check_plotting()
            check_destination(plot, overwrite=force, inputs=[file])  # before the run, never the document
        text = read_document(file).text
        from ..sampling import model_defaults

        lm = opts.load()
        engine = engine_for(lm, requested)
        params = model_defaults(getattr(lm.model, "generation_config", None), "answer")  # as lminf ask answers
        report = nd.NeedleReport(
            meta={"model": lm.name, "file": file, "settings": engine.settings.to_dict(), "reread": reread,
                  "reread_by": reread_by, "trained_length": engine.adapter.trained_length},
            lengths=lens, depths=deps if needles == 1 else ["all"], per_trial=needles)
        methods = [(bl.LMINF, nd.lminf_answers(lm, requested, max_new_tokens, reread, reread_by, params))]
        if lambda_alone:
            alone = {**{k: v for k, v in requested.items() if k not in RETRIEVAL}, "retrieval": False}
            methods.append((bl.LAMBDA, nd.lminf_answers(lm, alone, max_new_tokens, 0, reread_by, params)))
        if baseline:
            dense = bl.DenseModel(lm, budget=budget)
            dense.start_clock()
            methods.append((bl.VANILLA, nd.dense_answers(dense, max_new_tokens, engine.stop_ids())))
        for method, answer in methods:
            with task_progress(opts.quiet, bl.METHOD_LABELS[method], unit="documents") as progress:
                results = nd.run_needles(method, lm.tokenizer, text, plan, answer, progress)
            skipped = [r for r in results if r.skipped]
            if skipped:
                note(f"{bl.METHOD_LABELS[method]} skipped {len(skipped)} of {len(results)} questions "
                     f"(from {skipped[0].length:,} tokens): {skipped[0].skipped}")
            report.results += results
        grid = nd.needle_grid(report.results, needles == 1)
        columns = report.depths
        if plot:
            pl.plot_grid(grid, lens, columns, plot, "depth of the fact" if needles == 1 else "",
                         "document length (tokens)", "hits")
        if json_out:
            write_stdout(json.dumps(report.to_json(), indent=1) + "\n")
            return
        tokens: dict[int, list[int]] = {}
        for r in report.results:
            tokens.setdefault(r.length, []).append(r.tokens)
        what = "one fact per document" if needles == 1 else f"{needles} facts per document, recall"
        _print_grid(grid, lens, columns, tokens, lambda label: f"Needles found, {label} ({_shown(lm.name)}, {what})")


@eval_app.command("summary", cls=LminfCommand)
@with_options(EngineOptions, "opts")
def summary(
    files: Annotated[list[str], typer.Argument(help="The parts, one file each (two or more), joined in order.")],
    length: Annotated[str, typer.Option("--length", "-l", help="short, medium or long.")] = "medium",
    terms: Annotated[Optional[list[str]], typer.Option(
        "--terms", help="Key terms of a part, comma-separated; repeat once per part, in order [default: each "
        "part's most distinctive proper nouns].")] = None,
    oracle: Annotated[bool, typer.Option("--oracle/--no-oracle", help="Also summarize each part alone.")] = True,
    section_tokens: Annotated[Optional[int], typer.Option(
        "--section-tokens", help="As in summarize: tokens per section note [default: min(2048, n_local / 2)].")]
    = None,
    note_tokens: Annotated[int, typer.Option("--note-tokens", help="As in summarize: longest note.")] = 96,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", "-n", help="Longest summary [default: by --length].")] = None,
    json_out: JsonOpt = False,
    opts: EngineOptions = EngineOptions(),
) -> None:
    """Does a summary cover every part of a multi-part document?  Coverage of key terms, beside an oracle."""
    from ..documents import read_document
    from ..eval import summary as sm
    from ..prompts import summary_length

    with cli_errors():
        summary_length(length)
        check_positive("--note-tokens", note_tokens)
        check_positive("--max-new-tokens", max_new_tokens)
        check_positive("--section-tokens", section_tokens)
        if len(files) < 2:
            raise UsageError("eval summary needs at least two parts (one file each)")
        given = sm.parse_terms(terms, len(files))
        requested = opts.requested()
        parts = [read_document(f) for f in files]
        from ..sampling import model_defaults
        from ..tasks import summarize_source

        lm = opts.load()
        params = model_defaults(getattr(lm.model, "generation_config", None), "answer")  # as lminf summarize

        def summarize(doc):
            with task_progress(opts.quiet, f"Summarizing {doc.name}") as bar:
                return summarize_source(doc, lm, requested, length, max_new_tokens, params, section_tokens,
                                        note_tokens, progress=bar)[2]

        report = sm.evaluate_summary(parts, summarize, lambda t: len(lm.tokenizer.encode(t, add_special_tokens=False)),
                                     given, oracle, meta={"model": lm.name, "length": length})
        if json_out:
            write_stdout(json.dumps(report.to_json(), indent=1) + "\n")
            return
        _print_summary(report)


def _print_summary(report) -> None:
    from rich.table import Table

    console = stdout_console()
    table = Table(title=f"Summary coverage ({_shown(report.meta['model'])}, {report.meta['length']})",
                  title_justify="left")
    for col in ("part", "tokens", "key terms", "in the summary", "in its own summary (oracle)"):
        table.add_column(col)
    for p in report.parts:
        table.add_row(_shown(p.name), f"{p.tokens:,}", ", ".join(p.terms), ", ".join(p.in_summary) or "-",
                      "not run" if p.in_oracle is None else ", ".join(p.in_oracle) or "-")
    console.print(table)
    oracle = report.oracle_coverage
    t = report.timings
    lines = [f"coverage: {sum(p.covered for p in report.parts)}/{len(report.parts)} parts"
             + (f" (oracle: {round(oracle * len(report.parts))}/{len(report.parts)})" if oracle is not None else ""),
             "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())]
    if report.fallback:
        lines.append(f"the model's summary said nothing about part {', '.join(map(str, report.fallback_parts))}: "
                     "the section notes stood in for it")
    lines += ["", report.summary]
    for line in lines:
        console.print(line, highlight=False, markup=False)
