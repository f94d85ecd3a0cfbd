"""`python -m lminf_cli` runs the CLI."""

from .cli import run

run()
