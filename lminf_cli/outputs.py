"""Writing files without losing data: destinations checked before the work, no silent overwrite.

Every file lminf writes goes to a hidden temporary file in the destination folder
first and is then put in place in one step, so a crash or Ctrl-C never leaves half a
file under the real name.  Putting it in place without overwriting uses a hard link,
which fails if the name exists, even if it appeared while lminf was working.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError, UsageError


def check_destination(path: str, *, overwrite: bool, inputs: Iterable[str] = (),
                      how_to_overwrite: str = "pass --force to overwrite it") -> Path:
    """Refuse, before any work, a destination lminf must not or cannot write; returns it as a Path.

    Refused: a directory, one of the `inputs` (never overwritten, even when `overwrite`),
    an existing file unless `overwrite`, and a folder where no file can really be created
    (a missing folder, /proc, a read-only mount: tried, since os.access says yes to root).
    """
    target = Path(path).expanduser()
    try:
        st = os.stat(target)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"cannot write {path}: too many levels of symbolic links (a symlink loop)") from None
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path} is a directory; give a file name")
    if st is not None and (st.st_dev, st.st_ino) in _identities(inputs):
        raise UsageError(f"{path} is the document being read; lminf never writes over its input")
    if (st is not None or os.path.islink(target)) and not overwrite:
        raise UsageError(f"{path} already exists; {how_to_overwrite}")
    folder = target.parent
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lminf-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if not folder.is_dir():
            raise InputError(f"cannot write {path}: there is no folder {folder}") from None
        raise InputError(f"cannot write {path}: cannot create files in {folder} ({exc.strerror or exc})") from None
    return target


def _identities(sources: Iterable[str]) -> set[tuple[int, int]]:
    """(device, inode) of each source that exists; '-' is whatever stdin is."""
    out = set()
    for source in sources:
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(0) if source == "-" else os.stat(Path(source).expanduser())
            out.add((st.st_dev, st.st_ino))
    return out


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def publish(tmp: str | Path, target: Path, overwrite: bool) -> None:
    """Give a finished temporary file its real name: atomically, with the permissions a new file would get.

    mkstemp makes files readable by their owner only (0600); a state or transcript
    should be like any other file the user creates, so the umask decides.
    """
    os.chmod(tmp, 0o666 & ~current_umask())
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if the name exists: never overwrites, even in a race
    except FileExistsError:
        raise UsageError(f"{target} already exists (it appeared while lminf was working); nothing was "
                         "overwritten") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # A filesystem without hard links (FAT, some network mounts): check, then rename.
        if os.path.lexists(target):
            raise UsageError(f"{target} already exists; nothing was overwritten") from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def write_text(path: str | Path, text: str, overwrite: bool) -> None:
    """Write a text file through a temporary file and publish() (OSError for the caller to report)."""
    target = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".lminf-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp, target, overwrite)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
