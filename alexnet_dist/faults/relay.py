"""A relay process between a rank's stdout/stderr pipes and its launcher.

A launcher that disconnects (pdsh and its ssh sessions killed on SIGTERM, an mpirun
proxy gone) turns the rank's next print into EPIPE, which kills the rank before the
checkpoint its SIGTERM asked for. The relay owns the launcher's end and, once that is
gone, writes to ``run.dir/logs/rank<r>.log``; it exits when the rank does (EOF), after
passing on everything, also what a crashing rank wrote last.

This file is also the relay's program: :func:`guard_output` runs it as
``python -S relay.py LOG SRC:DST ...``, so it imports nothing but the standard library.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
from pathlib import Path

__all__ = ["guard_output"]

NO_RELAY = "ALEXNET_DIST_NO_RELAY"  # set (to anything) to leave the output as the launcher gave it


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def guard_output(run_dir: str | None, rank: int) -> subprocess.Popen | None:
    """Put the relay between this process's stdout/stderr and the launcher where they
    are pipes (files and terminals do not break); the relay's process, or None."""
    fds = [fd for fd in (1, 2) if _is_pipe(fd)]
    if not fds or os.environ.get(NO_RELAY):
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    pipes = {fd: os.pipe() for fd in fds}
    targets = {fd: os.dup(fd) for fd in fds}
    log = Path(run_dir or ".") / "logs" / f"rank{rank}.log"
    specs = [f"{r}:{targets[fd]}" for fd, (r, _) in pipes.items()]
    keep = [r for r, _ in pipes.values()] + list(targets.values())
    try:
        relay = subprocess.Popen([sys.executable, "-S", __file__, str(log.resolve()), *specs],
                                 stdin=subprocess.DEVNULL, pass_fds=keep, close_fds=True)
    except OSError:
        relay = None
    for fd, (r, w) in pipes.items():
        if relay is not None:
            os.dup2(w, fd)
        os.close(w)
        os.close(r)
    for t in targets.values():
        os.close(t)
    return relay


def _fallback(path: str) -> int:
    """The log file the relay writes to once the launcher's end is gone (/dev/null if it cannot)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY)


def _relay(log: str, pairs: dict[int, int]) -> None:
    """Copy each source fd to its destination until every source is at EOF."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # ends with the rank (EOF), never before it
    fallback = None
    while pairs:
        ready, _, _ = select.select(list(pairs), [], [])
        for src in ready:
            data = os.read(src, 65536)
            if not data:
                del pairs[src]
                continue
            try:
                while data:
                    data = data[os.write(pairs[src], data):]
            except OSError:  # the launcher's end is gone (pdsh/ssh closed): keep the rest in the log
                fallback = fallback if fallback is not None else _fallback(log)
                pairs = dict.fromkeys(pairs, fallback)
                try:
                    os.write(fallback, data)
                except OSError:
                    pass


if __name__ == "__main__":
    _relay(sys.argv[1], {int(src): int(dst) for src, dst in (spec.split(":") for spec in sys.argv[2:])})
