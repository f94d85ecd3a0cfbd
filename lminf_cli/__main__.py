"""`python -m lminf_cli` runs the CLI."""

import sys

try:
    from .cli.app import run
except KeyboardInterrupt:  # Ctrl-C while the CLI itself is still loading: no traceback
    sys.exit(130)

run()
