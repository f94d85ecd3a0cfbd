"""Charts (matplotlib, an optional extra): NLL by position, passkey heatmaps, bench time and memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..units import format_length
from .baseline import METHOD_LABELS
from .passkey import Cell, PasskeyReport, passkey_grid


def plot_nll(report: dict[str, Any], path: str | Path) -> None:
    """NLL by position for each method, the trained length marked, saved as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    for m in report["methods"].values():
        xs = [(b["start"] + b["end"]) / 2 / 1024 for b in m["buckets"] if b["tokens"]]
        ys = [b["nll"] for b in m["buckets"] if b["tokens"]]
        ax.plot(xs, ys, marker=".", linewidth=1.2, label=m["label"])
    L = report["trained_length"]
    ax.axvline(L / 1024, color="grey", linestyle="--", linewidth=1)
    ax.text(L / 1024, ax.get_ylim()[1], f" trained length ({format_length(L)})", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position (k tokens)")
    ax.set_ylabel(f"mean NLL per {format_length(report['bucket'])} bucket (nats)")
    ax.set_title(f"{report.get('model', '')}: {report.get('file', '')}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib (pip install 'lminf[bench]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    """Fail early (before a long run) when --plot cannot work."""
    _pyplot()


def plot_passkey(report: PasskeyReport, path: str | Path) -> None:
    """Passkey accuracy heatmaps (length x depth), one panel per method, saved as PNG."""
    plot_grid(passkey_grid(report.results), report.lengths, report.depths, path, "depth of the key",
              "prompt length (tokens)", "accuracy")


def plot_grid(grid: dict[str, dict[int, dict[Any, Cell]]], lengths: list[int], columns: list, path: str | Path,
              xlabel: str, ylabel: str, label: str) -> None:
    """Heatmaps of hits (a row per length, a column per depth), one panel per method, saved as PNG."""
    plt = _pyplot()
    methods = list(grid)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods) + 0.8, 0.5 * len(lengths) + 2),
                             dpi=120, squeeze=False)
    image = None
    for ax, m in zip(axes[0], methods, strict=True):
        data = [[_cell_value(grid[m].get(n, {}).get(d)) for d in columns] for n in lengths]
        image = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, n in enumerate(lengths):
            for j, d in enumerate(columns):
                c = grid[m].get(n, {}).get(d)
                text = "-" if c is None or c.accuracy is None else f"{c.correct}/{c.total}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(columns)), [f"{d:g}" if isinstance(d, float) else str(d) for d in columns])
        ax.set_yticks(range(len(lengths)), [format_length(n) for n in lengths])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(METHOD_LABELS[m])
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label=label)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _cell_value(c: Cell | None) -> float:
    return float("nan") if c is None or c.accuracy is None else c.accuracy


def plot_bench(results: Any, path: str | Path) -> None:
    """Encode time and peak memory against length, both variants of `lminf bench`."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, style in (("baseline", "o--"), ("baseline-same", "^:"), ("lminf", "s-")):
        rows = [r for r in results if r.variant == variant and r.status == "ok"]
        if not rows:
            continue
        xs = [r.length for r in rows]
        label = f"{variant} ({rows[0].precision})" if getattr(rows[0], "precision", "") else variant
        ax1.plot(xs, [r.encode_seconds for r in rows], style, label=label)
        ax2.plot(xs, [r.peak_memory_bytes / 2**30 for r in rows], style, label=label)
    for ax, ylabel in ((ax1, "encode time (s)"), (ax2, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
