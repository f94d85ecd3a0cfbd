"""The one progress callback type of the core.

Long operations (reading PDF pages, encoding, scoring, condensing notes) call
`progress(done, total)` as they go; the CLI draws it on stderr, the core never prints.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]
