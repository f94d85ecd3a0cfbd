"""CLI command groups beyond `continue`, each in its own module.

Each module defines `register(app)`; add new ones to MODULES.
"""

from __future__ import annotations

import importlib

import typer

MODULES: list[str] = ["bench", "evaluate", "documents"]


def register_all(app: typer.Typer) -> None:
    """Attach every command module's commands to the app."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
