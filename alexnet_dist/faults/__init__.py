"""When part of a job fails: every rank stops, and says in one line what happened.

A job on several hosts meets failures a single process never does: a rank killed (OOM
killer, ``kill -9``, a node lost), a launcher that goes away while its ranks still
write to it (pdsh/ssh closed on SIGTERM), a disk that fills up during a checkpoint.
Each part of the answer has its own module:

* :mod:`~alexnet_dist.faults.roster` -- every rank's host, pid and address, gathered
  once at the start, and which of them are gone;
* :mod:`~alexnet_dist.faults.relay` -- a small process between a rank's output and its
  launcher, so a launcher that disconnects cannot kill the rank with EPIPE half way
  through its checkpoint;
* :mod:`~alexnet_dist.faults.launcher` -- ranks whose launcher was killed stop (after a
  checkpoint) instead of training on unseen;
* :mod:`~alexnet_dist.faults.reports` -- survivors of a failed collective tell each
  other, through the job's store, which ranks they saw die;
* :mod:`~alexnet_dist.faults.disk` -- a full disk, named with what was being written and
  which checkpoint is intact;
* :mod:`~alexnet_dist.faults.diagnose` -- the one line for a failure, from the above.

:func:`register_rank` (once the process group is up) returns the :class:`FaultContext`
that ``main()`` hands to :func:`report_failure` in its last ``except``.
"""

from __future__ import annotations

import os
import sys

from alexnet_dist.faults.diagnose import FaultContext, describe_failure
from alexnet_dist.faults.launcher import watch_launchers
from alexnet_dist.faults.relay import guard_output
from alexnet_dist.faults.roster import gather_roster

__all__ = ["FaultContext", "describe_failure", "register_rank", "report_failure"]


def register_rank(run_dir: str | os.PathLike | None, store=None) -> FaultContext:
    """Record this rank with every other one, guard its output and watch its launcher (a
    launcher that dies sends this process SIGTERM); call on every rank once the default
    process group is up (collective: one ``all_gather_object``).
    ``store`` is the job's store (:func:`alexnet_dist.distributed.init_distributed`)."""
    run_dir = os.fspath(run_dir) if run_dir is not None else None
    roster = gather_roster()
    if roster is not None and roster.world_size > 1:
        guard_output(run_dir, roster.rank)
    watch_launchers()
    return FaultContext(run_dir=run_dir, roster=roster, store=store)


def report_failure(exc: BaseException, where: str, context: FaultContext | None = None) -> int:
    """For ``main()``'s last ``except Exception``: print ``error <where>: <line>`` on stderr
    and return 1; re-raise ``exc`` when it is not a failure this package recognises."""
    try:
        reason = describe_failure(exc, context)
    except Exception:  # describing must never hide the failure itself
        reason = None
    if reason is None:
        raise exc
    sys.stderr.write(f"error {where}: {reason}\n")
    sys.stderr.flush()
    return 1
