"""Helpers for the reliability tests (faults, bad input, emulated cluster, soak): jobs that
run in the background, their rank processes, polling with deadlines, shared reference runs.

Every wait here polls a condition against a deadline; nothing sleeps as synchronisation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from alexnet_dist.checkpoint import Checkpoints
from tests.launch import EXACT, REPO, SMALL, check, command, losses, records, train

__all__ = [
    "FAULT_SETS", "Job", "close", "dataset_cache", "error_lines", "metric_steps", "rank_processes",
    "reference_run", "set_args", "wait_until",
]

# Exact, checkpoints every 2 steps (kept), collectives bounded well under the 60 s promise.
FAULT_SETS = [*EXACT, "run.checkpoint_every=2", "run.keep_last=50", "run.collective_timeout_s=30"]

_memo: dict = {}


def dataset_cache(tmp_path_factory) -> Path:
    """One data.cache_dir (demo data set, scan caches) for all reliability tests of a session."""
    if "cache" not in _memo:
        _memo["cache"] = tmp_path_factory.mktemp("reliability-cache")
    return _memo["cache"]


def reference_run(tmp_path_factory, launcher: str, ranks: int, *sets: str) -> Path:
    """An uninterrupted run, made once per session for each (launcher, ranks, sets)."""
    key = (launcher, ranks, sets)
    if key not in _memo:
        run = tmp_path_factory.mktemp(f"reference-{launcher}{ranks}")
        check(train(launcher, ranks, run, *sets, cache=dataset_cache(tmp_path_factory), timeout=400))
        _memo[key] = run
    return _memo[key]


def set_args(run_dir: Path, cache: Path, *sets: str) -> list[str]:
    """train.py's arguments for the small exact job in ``run_dir``."""
    args: list[str] = []
    for s in [*SMALL, f"run.dir={run_dir}", f"data.cache_dir={cache}", *sets]:
        args += ["--set", s]
    return args


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_for_steps(run_dir: Path, steps: int = 3) -> None:
    """Until ``run_dir``'s metrics.jsonl holds ``steps`` training steps: the job is training."""
    wait_until(lambda: len(metric_steps(run_dir)) >= steps, 240, f"step {steps} in metrics.jsonl")


def wait_for_ranks(n: int, *, launcher_pid: int | None = None, run_dir: Path | None = None) -> dict[int, psutil.Process]:
    """The job's ``n`` rank processes (found as :func:`rank_processes` finds them), once all are up."""
    return wait_until(lambda: (r := rank_processes(launcher_pid=launcher_pid, run_dir=run_dir)) and len(r) == n and r,
                      30, f"{n} rank processes")


def wait_until_gone(alive: Callable[[], object], since: float, deadline: float) -> None:
    """Until ``alive()`` is falsy, at most ``deadline`` s after ``since`` (a ``time.monotonic()``)."""
    wait_until(lambda: not alive(), deadline - (time.monotonic() - since), "every rank to exit")


def metric_steps(run_dir: Path) -> list[int]:
    """Training steps logged so far (tolerates a line being written right now)."""
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text()
    except OSError:
        return []
    import json

    steps = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if "split" not in r:
                steps.append(r["step"])
    return steps


def interrupted_at(run: Path, dst: Path, step: int) -> Path:
    """``dst`` as if the job of ``run`` had stopped right after its checkpoint of ``step``:
    that checkpoint, and the metrics up to it."""
    tag = Checkpoints.tag(step)
    shutil.copytree(run / "checkpoints" / tag, dst / "checkpoints" / tag)
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dst


def error_lines(text: str) -> list[str]:
    """Lines of the form ``error [rank r/w]: ...`` (pdsh prefixes ``nodeN: ``)."""
    out = []
    for line in text.splitlines():
        line = line.split(": ", 1)[1] if line.startswith("node") and ": error [" in line else line
        if line.startswith("error ["):
            out.append(line)
    return out


def close(a: list[float], b: list[float], rel: float = 1e-5) -> None:
    assert len(a) == len(b), (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert math.isclose(x, y, rel_tol=rel), f"step {i + 1}: {x} != {y}\n{a}\n{b}"


def rank_processes(*, launcher_pid: int | None = None, run_dir: Path | None = None) -> dict[int, psutil.Process]:
    """The train.py rank processes, by global rank: children of ``launcher_pid`` (one node),
    or any process whose command line names ``run_dir`` (ranks on emulated nodes)."""
    if launcher_pid is not None:
        try:
            procs = psutil.Process(launcher_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
    else:
        procs = list(psutil.process_iter())
    ranks = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            if not any(c.endswith("train.py") for c in cmd) or "deepspeed.launcher.launch" in cmd:
                continue
            if run_dir is not None and f"run.dir={run_dir}" not in cmd:
                continue
            env = p.environ()
            rank = env.get("RANK") or env.get("PMI_RANK") or env.get("SLURM_PROCID")
            if rank is not None:
                ranks[int(rank)] = p
    return ranks


@dataclass
class Job:
    """A launcher started in its own session (its process group is the job), output to a file."""

    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Job:
        env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        job = cls([str(c) for c in cmd], Path(log), env)
        with open(job.log, "wb") as out:
            job.proc = subprocess.Popen(job.cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return job

    @classmethod
    def train(cls, launcher: str, ranks: int, run_dir: Path, cache: Path, *sets: str) -> Job:
        return cls.start(command(launcher, ranks, set_args(run_dir, cache, *sets)), Path(f"{run_dir}.log"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def group_alive(self) -> list[int]:
        """PIDs still in the job's process group (launcher, ranks, their helpers)."""
        alive = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(p.pid) == self.pid and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
        return alive

    def wait(self, timeout: float) -> int:
        """The launcher's exit status; AssertionError if it runs past ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.cmd[0]} still running after {timeout:.0f} s:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """Teardown: SIGKILL the whole process group and reap the launcher."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=30)

    def tail(self, n: int = 4000) -> str:
        return self.output()[-n:]


# Re-exported for the test modules.
__all__ += ["EXACT", "SMALL", "check", "command", "losses", "records", "train"]
