"""Ranks notice when their launcher is gone, and stop.

A ``kill -9`` of ``deepspeed`` (or ``torchrun``, ``mpirun``) kills that process alone:
its node launcher and the ranks under it are re-parented and train on, unseen, writing
into run.dir to the end, and a job started again on the same run.dir finds it locked.
Nothing tells a process that an ancestor died, so each rank watches the launchers above
it (the nearest ancestors whose command is a launcher's) and, when one is gone, stops
the way SIGTERM stops it: a checkpoint at the next step boundary, then exit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import psutil

from alexnet_dist.distributed import launcher_ancestors
from alexnet_dist.metrics import say

__all__ = ["watch_launchers"]

POLL_S = 1.0  # how often a watching rank looks; a parent's exit sends it no event


def _alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs: not exited, not a zombie its parent has yet to reap, and
    not another process that reused its pid (psutil compares the start time)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_this_process(what: str) -> None:
    say(f"the launcher {what} is gone: this rank stops at the next step boundary, after a checkpoint")
    os.kill(os.getpid(), signal.SIGTERM)


def watch_launchers(on_gone: Callable[[str], None] = _stop_this_process,
                    interval: float = POLL_S) -> threading.Thread | None:
    """Call ``on_gone("<command> (pid P)")`` once, from a daemon thread, when a launcher above
    this process exits; by default that sends this process SIGTERM. None when there is none."""
    chain = launcher_ancestors()
    if not chain:
        return None

    def watch() -> None:
        while True:
            gone = next((f"{name} (pid {proc.pid})" for proc, name in chain if not _alive(proc)), None)
            if gone is not None:
                on_gone(gone)
                return
            time.sleep(interval)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
