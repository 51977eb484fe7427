"""Write a file so that a reader sees either the old file or the complete new one, never a part.

Every file this package writes (counterexamples, captures, pictures) goes through
:func:`atomic_write`: the bytes go into a new temporary file of the same directory, created
exclusively under an unpredictable name (``O_EXCL``, ``O_NOFOLLOW``: a link planted there is
never followed), are flushed to disk (``fsync``), and the temporary file then replaces the
destination in one ``os.replace``. A save that fails part-way (disk full, quota, a kill) leaves
the earlier file with that name intact; two processes saving one name at once leave one of the
two complete files. A destination that is a symbolic link, a directory or a device is refused,
not followed: its target is never written. Failures raise :class:`SaveError` (an ``OSError``)
whose message names the path and why.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["SaveError", "atomic_write"]


class SaveError(OSError):
    """A file could not be written; the message names the path and the reason."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then make it ``path`` atomically.

    The directory is created if needed. Returns ``path`` as an absolute path.
    """
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"{path}: its directory cannot be created ({exc.strerror or exc})") \
            from None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SaveError(f"{path}: cannot be inspected ({exc.strerror or exc})") from None
    else:
        if not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise SaveError(f"{path}: refused to write over {kind} (it is never followed); "
                            "remove it or choose another directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise SaveError(f"{path}: no temporary file in its directory ({exc.strerror or exc})") \
            from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o644)  # as an ordinary new file; mkstemp's 0600 hides it from CI
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SaveError(f"{path}: not written ({exc.strerror or exc}); an earlier file of "
                            "that name, if any, is unchanged") from None
        raise
    with contextlib.suppress(OSError):  # the rename itself on disk (best effort)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
