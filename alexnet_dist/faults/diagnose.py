"""The one line for a failure of the job rather than of this rank's code.

Recognised: a collective or store operation that failed because another rank is gone
or silent (named with its pid and host when this rank can tell), a rendezvous that
timed out with ranks missing, and a full disk. Anything else is ``None``: a bug keeps
its traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from alexnet_dist.faults.disk import disk_full
from alexnet_dist.faults.reports import REPORT_WINDOW_S, post_and_collect
from alexnet_dist.faults.roster import Roster

__all__ = ["FaultContext", "describe_failure"]

# What gloo, the c10d store and TCP say when a peer or the store is gone or silent.
_COLLECTIVE_PATTERNS = re.compile(
    r"gloo|c10d|connection (closed|reset|refused)|broken pipe|timed? ?out|socket|clients joined|"
    r"failed to (connect|recv|send)|by peer",
    re.IGNORECASE,
)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")
_TAIL = "every rank stops; start the job again to resume from the newest complete checkpoint"


@dataclass(frozen=True)
class FaultContext:
    """What a rank knows of its job when something fails (:func:`register_rank` makes it)."""

    run_dir: str | None = None
    roster: Roster | None = None
    store: object | None = None  # the job's c10d store


def _chain(exc: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # gloo's source location
    text = text.split(". This is typically")[0]
    return text[:200] or type(exc).__name__


def _rendezvous_failed(text: str, cause: str) -> str:
    """init_process_group failed: the ranks never all met at the start of the job."""
    if not re.search(r"timed? ?out|timeout", text, re.I):
        return f"the ranks could not connect to each other at the start of the job ({cause})"
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    who = f"only {joined.group(1)} of {joined.group(2)} ranks" if joined else "not every rank"
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (f"{who} reached the rendezvous at {master} within run.collective_timeout_s: the others never "
            "started (a host in the hostfile that cannot be reached, a launcher that failed on some node, "
            "or the wrong master address); see the launcher's output above")


def _peer_lost(text: str, cause: str, context: FaultContext) -> str:
    """A collective failed with the job running: find out from the survivors who is gone."""
    import torch.distributed as dist

    roster = context.roster or Roster(dist.get_rank(), dist.get_world_size(), ())
    dead, reported, store_ok = post_and_collect(context.store, roster.rank, roster.world_size,
                                                roster.dead_on_this_host(), REPORT_WINDOW_S)
    if dead:
        verb = "is" if len(dead) == 1 else "are"
        return (f"{roster.who(dead)} {verb} gone (killed or exited); this rank's collective failed with it "
                f"({cause}); {_TAIL}")
    silent = set(range(roster.world_size)) - reported if store_ok else set()
    if silent:
        return (f"{roster.who(silent)} did not answer after a collective failed ({cause}): "
                f"hung, cut off, or gone; {_TAIL}")
    if not store_ok and roster.rank != 0:
        return (f"{roster.who([0])} is gone or unreachable: the job's store on it does not answer, "
                f"and this rank's collective failed ({cause}); {_TAIL}")
    peer = _PEER_ADDRESS.search(text)
    if peer:
        return f"lost the connection to a rank on {roster.hosts_at(peer.group(1))} ({cause}); {_TAIL}"
    return f"a collective failed on every rank ({cause}); {_TAIL}"


def describe_failure(exc: BaseException, context: FaultContext | None = None) -> str | None:
    """One line for a failure of the job rather than of this rank's code, or None.

    Collective failures take up to :data:`~alexnet_dist.faults.reports.REPORT_WINDOW_S`
    seconds: the survivors compare notes in the store.
    """
    context = context or FaultContext()
    chain = _chain(exc)
    disk = disk_full(chain, context.run_dir)
    if disk:
        return disk
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    import torch.distributed as dist

    if not any(isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _COLLECTIVE_PATTERNS.search(str(e)))
               for e in chain):
        return None
    text = " ".join(str(e) for e in chain)
    cause = _first_line(next(e for e in chain if isinstance(e, RuntimeError)))
    if not dist.is_initialized():
        return _rendezvous_failed(text, cause)
    return _peer_lost(text, cause, context)
