"""A full disk, said as what could not be written, where, and which checkpoint is intact."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from alexnet_dist.checkpoint import Checkpoints

__all__ = ["LOW_SPACE_BYTES", "disk_full"]

# Free space under which a failed checkpoint write is put down to a full disk.
LOW_SPACE_BYTES = 64 << 20
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|unexpected pos|file write failed", re.I)


def _free_bytes(path: str) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def disk_full(chain: list[BaseException], run_dir: str | None) -> str | None:
    """The one line for a full disk among the exceptions of ``chain``, or None."""
    full = next((e for e in chain if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
    torch_write = next((e for e in chain if _TORCH_WRITE_FAILURE.search(str(e))), None)
    if full is None and torch_write is None:
        return None
    where = run_dir or (full.filename if full is not None and full.filename else ".")
    free = _free_bytes(where)
    if full is None and (free is None or free >= LOW_SPACE_BYTES):
        return None  # a torch write that failed for another reason: keep its traceback
    checkpoints = Checkpoints(run_dir or ".")
    done, partial = checkpoints.newest(), checkpoints.newest_incomplete()
    if full is not None and full.filename and "checkpoints" not in Path(str(full.filename)).parts:
        what = str(full.filename)  # metrics.jsonl, config.yaml, ...
    else:
        what = f"checkpoint {partial.name}" if partial else "a checkpoint"
    kept = (f"the newest complete checkpoint {done.name} is intact and a restart resumes from it" if done
            else "there is no complete checkpoint yet")
    space = f"{_size(free)} free" if free is not None else "free space unknown"
    return (f"no space left on device: could not write {what} under {where} ({space}); {kept}. "
            "Free some space or set run.dir to a larger disk")
