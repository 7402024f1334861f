"""When part of a job fails: every rank stops, and says in one line what happened.

A job on several hosts meets failures a single process never does: a rank killed (OOM
killer, ``kill -9``, a node lost), a launcher that goes away while its ranks still
write to it (pdsh/ssh closed on SIGTERM), a disk that fills up during a checkpoint.
This module turns those into one line per surviving rank and keeps the stop path of a
preempted job working.

* :func:`register_rank` -- once the process group is up (one all-gather): every rank's
  host, pid and address, kept for :func:`describe_failure`; and, where stdout/stderr
  are pipes, a small relay process that owns the launcher's end so that a launcher
  that disconnects can never kill a rank with EPIPE half way through its checkpoint
  (the rank's output then goes to ``run.dir/logs/rank<r>.log``).
* :func:`describe_failure` -- the one-line reason for a collective that failed (which
  rank is gone, found from the recorded pids of this host and from what the other
  survivors post in the job's store), a rendezvous where some ranks never arrived, a
  full disk; ``None`` for anything else (a bug keeps its traceback).
* :func:`report_failure` -- ``main()``'s last ``except``: print that line as
  ``error [rank r/w]: ...`` and return 1, or re-raise what it does not recognise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

__all__ = ["RankInfo", "describe_failure", "register_rank", "report_failure", "roster"]

# How long survivors of a failure wait for each other's reports in the store (seconds).
REPORT_WINDOW_S = 5.0
# Free space under which a failed checkpoint write is put down to a full disk.
LOW_SPACE_BYTES = 64 << 20
_PREFIX = "alexnet_dist/faults/"

# What gloo, the c10d store and TCP say when a peer or the store is gone or silent.
_COLLECTIVE_PATTERNS = re.compile(
    r"gloo|c10d|connection (closed|reset|refused)|broken pipe|timed? ?out|socket|clients joined|"
    r"failed to (connect|recv|send)|by peer",
    re.IGNORECASE,
)
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|unexpected pos|file write failed", re.I)
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str
    pid: int
    addr: str  # this host's address towards the master (what peers see in gloo errors)


@dataclass
class _State:
    rank: int = 0
    world_size: int = 1
    roster: tuple[RankInfo, ...] = ()
    run_dir: str | None = None
    store: object | None = None
    relay: subprocess.Popen | None = None


_state = _State()


def roster() -> tuple[RankInfo, ...]:
    """Every rank's :class:`RankInfo`, in rank order (empty before :func:`register_rank`)."""
    return _state.roster


# ---------------------------------------------------------------------- registering


def _address_towards(master: str) -> str:
    """The local address this host uses to reach ``master`` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            return s.getsockname()[0]
    except OSError:
        return "?"


def register_rank(run_dir: str | os.PathLike | None = None) -> None:
    """Record this rank with every other one; call on every rank once the default
    process group is up (it is collective). Cheap: one ``all_gather_object``."""
    import torch.distributed as dist

    _state.run_dir = os.fspath(run_dir) if run_dir is not None else None
    if not dist.is_initialized():
        return
    _state.rank, _state.world_size = dist.get_rank(), dist.get_world_size()
    me = RankInfo(_state.rank, socket.gethostname(), os.getpid(),
                  _address_towards(os.environ.get("MASTER_ADDR", "127.0.0.1")))
    everyone: list = [None] * _state.world_size
    if _state.world_size > 1:
        dist.all_gather_object(everyone, asdict(me))
    else:
        everyone = [asdict(me)]
    _state.roster = tuple(RankInfo(**e) for e in everyone)
    try:
        _state.store = dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it only local pids name the dead rank
        _state.store = None
    if _state.world_size > 1:
        _guard_output()


# ---------------------------------------------------------------------- output relay

_RELAY = r"""
import os, select, signal, sys
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # ends with the rank (EOF), never before it
fallback_path = sys.argv[1]
pairs = {}
for spec in sys.argv[2:]:
    src, dst = map(int, spec.split(":"))
    pairs[src] = dst
fallback = None
while pairs:
    ready, _, _ = select.select(list(pairs), [], [])
    for src in ready:
        data = os.read(src, 65536)
        if not data:
            del pairs[src]
            continue
        dst = pairs[src]
        try:
            while data:
                data = data[os.write(dst, data):]
        except OSError:
            # The launcher's end is gone (pdsh/ssh closed): keep the rest in a file.
            if fallback is None:
                try:
                    os.makedirs(os.path.dirname(fallback_path), exist_ok=True)
                    fallback = os.open(fallback_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                except OSError:
                    fallback = os.open(os.devnull, os.O_WRONLY)
            for fd in pairs:
                pairs[fd] = fallback
            try:
                os.write(fallback, data)
            except OSError:
                pass
"""


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _guard_output() -> None:
    """Put a relay process between this rank's stdout/stderr pipes and the launcher.

    A launcher that disconnects (pdsh and its ssh sessions killed on SIGTERM, an mpirun
    proxy gone) turns the rank's next print into EPIPE, which kills the rank before the
    checkpoint its SIGTERM asked for. The relay owns the launcher's end and, once that is
    gone, writes to ``run.dir/logs/rank<r>.log``; it exits when the rank does (EOF), after
    passing on everything, also what a crashing rank wrote last.
    """
    if _state.relay is not None or os.environ.get("ALEXNET_DIST_NO_RELAY"):
        return
    fds = [fd for fd in (1, 2) if _is_pipe(fd)]
    if not fds:
        return  # files and terminals do not break
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    pipes = {fd: os.pipe() for fd in fds}
    targets = {fd: os.dup(fd) for fd in fds}
    logs = Path(_state.run_dir or ".") / "logs" / f"rank{_state.rank}.log"
    specs = [f"{r}:{targets[fd]}" for fd, (r, _) in pipes.items()]
    keep = [r for r, _ in pipes.values()] + list(targets.values())
    try:
        relay = subprocess.Popen(
            [sys.executable, "-S", "-c", _RELAY, str(logs.resolve()), *specs],
            stdin=subprocess.DEVNULL, pass_fds=keep, close_fds=True,
        )
    except OSError:
        for r, w in pipes.values():
            os.close(r)
            os.close(w)
        for t in targets.values():
            os.close(t)
        return
    for fd, (r, w) in pipes.items():
        os.dup2(w, fd)
        os.close(w)
        os.close(r)
    for t in targets.values():
        os.close(t)
    _state.relay = relay


# ---------------------------------------------------------------------- describing


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its launcher has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _dead_on_this_host() -> set[int]:
    host = socket.gethostname()
    return {r.rank for r in _state.roster if r.host == host and r.rank != _state.rank and not _pid_alive(r.pid)}


def _post_and_collect(seen_dead: set[int], window: float) -> tuple[set[int], set[int], bool]:
    """Tell the other survivors what this rank saw; gather theirs for up to ``window`` s.

    Returns (dead ranks, ranks that reported, whether the store answered). A rank that
    reported is a survivor, even if it has exited since (it stopped because of the
    failure, it did not cause it): only ranks that never reported count as dead.
    Global rank 0 hosts the store: it waits until every rank that is not known dead
    reported, so the others can still read; the others stop as soon as a dead rank is named.
    """
    store = _state.store
    if store is None:
        return seen_dead, set(), False
    try:
        store.set_timeout(timedelta(seconds=2))
        store.set(f"{_PREFIX}report/{_state.rank}", json.dumps(sorted(seen_dead)))
    except Exception:
        return seen_dead, set(), False
    reports: dict[int, set[int]] = {_state.rank: set(seen_dead)}
    deadline = time.monotonic() + window
    everyone = set(range(_state.world_size))
    while True:
        try:
            for r in everyone - set(reports):
                key = f"{_PREFIX}report/{r}"
                if store.check([key]):
                    reports[r] = set(json.loads(store.get(key)))
        except Exception:  # the store (rank 0) is gone
            return set().union(*reports.values()) - set(reports), set(reports), False
        reported = set(reports)
        dead = set().union(*reports.values()) - reported
        if (reported | dead) >= everyone or time.monotonic() > deadline or (dead and _state.rank != 0):
            return dead, reported, True
        time.sleep(0.1)


def _who(ranks) -> str:
    parts = []
    by_rank = {r.rank: r for r in _state.roster}
    for rank in sorted(ranks):
        info = by_rank.get(rank)
        parts.append(f"rank {rank} (pid {info.pid} on {info.host})" if info else f"rank {rank}")
    return ", ".join(parts)


def _hosts_at(address: str) -> str:
    ranks = [r.rank for r in _state.roster if r.addr == address]
    if not ranks:
        return address
    host = next(r.host for r in _state.roster if r.addr == address)
    return f"{host} ({address}: ranks {', '.join(map(str, ranks))})"


def _checkpoint_dirs() -> tuple[str | None, str | None]:
    """(newest complete, newest incomplete) checkpoint names under run.dir."""
    root = Path(_state.run_dir or ".") / "checkpoints"
    try:
        dirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return None, None
    complete = [p.name for p in dirs if (p / "COMPLETE").is_file()]
    incomplete = [p.name for p in dirs if not (p / "COMPLETE").is_file()]
    return (complete[-1] if complete else None), (incomplete[-1] if incomplete else None)


def _free_bytes(path: str) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _disk_full(chain: list[BaseException]) -> str | None:
    full = next((e for e in chain if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
    torch_write = next((e for e in chain if _TORCH_WRITE_FAILURE.search(str(e))), None)
    if full is None and torch_write is None:
        return None
    where = _state.run_dir or (full.filename if full is not None and full.filename else ".")
    free = _free_bytes(where)
    if full is None and (free is None or free >= LOW_SPACE_BYTES):
        return None  # a torch write that failed for another reason: keep its traceback
    done, partial = _checkpoint_dirs()
    if full is not None and full.filename and "checkpoints" not in Path(str(full.filename)).parts:
        what = str(full.filename)  # metrics.jsonl, config.yaml, ...
    else:
        what = f"checkpoint {partial}" if partial else "a checkpoint"
    kept = (f"the newest complete checkpoint {done} is intact and a restart resumes from it" if done
            else "there is no complete checkpoint yet")
    space = f"{_size(free)} free" if free is not None else "free space unknown"
    return (f"no space left on device: could not write {what} under {where} ({space}); {kept}. "
            "Free some space or set run.dir to a larger disk")


def describe_failure(exc: BaseException) -> str | None:
    """One line for a failure of the job rather than of this rank's code, or None.

    Recognised: a collective or store operation that failed because another rank is
    gone or silent (the line names it, with its pid and host, when this rank can tell),
    a rendezvous that timed out with ranks missing, and a full disk. Collective failures
    take up to :data:`REPORT_WINDOW_S` seconds: the survivors compare notes in the store.
    """
    chain = _chain(exc)
    disk = _disk_full(chain)
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
    if not dist.is_initialized():  # init_process_group failed: the rendezvous at the start of the job
        if not re.search(r"timed? ?out|timeout", text, re.I):
            return f"the ranks could not connect to each other at the start of the job ({cause})"
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        who = f"only {joined.group(1)} of {joined.group(2)} ranks" if joined else "not every rank"
        master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return (f"{who} reached the rendezvous at {master} within run.collective_timeout_s: the others never "
                "started (a host in the hostfile that cannot be reached, a launcher that failed on some node, "
                "or the wrong master address); see the launcher's output above")
    if not _state.roster:  # register_rank was not called: no pids to check, the store still helps
        _state.rank, _state.world_size = dist.get_rank(), dist.get_world_size()
        with contextlib.suppress(Exception):
            _state.store = _state.store or dist.distributed_c10d._get_default_store()
    dead = _dead_on_this_host()
    dead, reported, store_ok = _post_and_collect(dead, REPORT_WINDOW_S)
    tail = "every rank stops; start the job again to resume from the newest complete checkpoint"
    if dead:
        verb = "is" if len(dead) == 1 else "are"
        return f"{_who(dead)} {verb} gone (killed or exited); this rank's collective failed with it ({cause}); {tail}"
    silent = set(range(_state.world_size)) - reported if store_ok else set()
    if silent:
        return (f"{_who(silent)} did not answer after a collective failed ({cause}): "
                f"hung, cut off, or gone; {tail}")
    if not store_ok and _state.rank != 0:
        return (f"{_who([0])} is gone or unreachable: the job's store on it does not answer, "
                f"and this rank's collective failed ({cause}); {tail}")
    peer = _PEER_ADDRESS.search(text)
    if peer:
        return f"lost the connection to a rank on {_hosts_at(peer.group(1))} ({cause}); {tail}"
    return f"a collective failed on every rank ({cause}); {tail}"


def report_failure(exc: BaseException, where: str) -> int:
    """For ``main()``'s last ``except Exception``: print ``error <where>: <line>`` on stderr
    and return 1; re-raise ``exc`` when it is not a failure this module recognises."""
    try:
        reason = describe_failure(exc)
    except Exception:  # describing must never hide the failure itself
        reason = None
    if reason is None:
        raise exc
    sys.stderr.write(f"error {where}: {reason}\n")
    sys.stderr.flush()
    return 1
