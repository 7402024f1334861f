"""File-system helpers for caches that several processes share."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator

__all__ = ["locked", "write_atomically"]


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing; a no-op where the file system has no locks)."""
    with open(path, "a") as f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_atomically(path: str, content: str | bytes) -> None:
    """Replace ``path`` with ``content``: readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    with open(fd, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, path)
