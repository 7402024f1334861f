"""Survivors of a failed collective tell each other, through the job's store, which
ranks they saw die, so each can name the rank that is gone."""

from __future__ import annotations

import json
import time
from datetime import timedelta

__all__ = ["REPORT_WINDOW_S", "post_and_collect"]

# How long survivors of a failure wait for each other's reports in the store (seconds).
REPORT_WINDOW_S = 5.0
_PREFIX = "alexnet_dist/faults/report/"


def post_and_collect(store, rank: int, world_size: int, seen_dead: set[int],
                     window: float = REPORT_WINDOW_S) -> tuple[set[int], set[int], bool]:
    """Tell the other survivors what this rank saw; gather theirs for up to ``window`` s.

    Returns (dead ranks, ranks that reported, whether the store answered). A rank that
    reported is a survivor, even if it has exited since (it stopped because of the
    failure, it did not cause it): only ranks that never reported count as dead.
    Global rank 0 hosts the store: it waits until every rank that is not known dead
    reported, so the others can still read; the others stop as soon as a dead rank is named.
    """
    if store is None:
        return seen_dead, set(), False
    try:
        store.set_timeout(timedelta(seconds=2))
        store.set(f"{_PREFIX}{rank}", json.dumps(sorted(seen_dead)))
    except Exception:
        return seen_dead, set(), False
    reports: dict[int, set[int]] = {rank: set(seen_dead)}
    deadline = time.monotonic() + window
    everyone = set(range(world_size))
    while True:
        try:
            for r in everyone - set(reports):
                key = f"{_PREFIX}{r}"
                if store.check([key]):
                    reports[r] = set(json.loads(store.get(key)))
        except Exception:  # the store (rank 0) is gone
            return set().union(*reports.values()) - set(reports), set(reports), False
        reported = set(reports)
        dead = set().union(*reports.values()) - reported
        if (reported | dead) >= everyone or time.monotonic() > deadline or (dead and rank != 0):
            return dead, reported, True
        time.sleep(0.1)  # polling the store: it has no wait-for-any-of-these-keys
