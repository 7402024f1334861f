"""Test fixtures for multi-node launches on one machine: an emulated cluster (network
namespaces + sshd, ``launch/emulate_cluster.sh``) and a one-machine SLURM
(``launch/slurm_local.sh``).

Both need root and the Debian packages from ``launch/install_cluster_deps.sh``. Without
them a test using them is skipped with the reason, so the suite passes for a user without
root; CI sets ``ALEXNET_DIST_CLUSTER_TESTS=required`` (``.ci/run``, after installing the
packages), and there they raise :class:`ClusterUnavailable` instead: CI never skips them.

Context managers (always torn down, also when the body or the start-up fails)::

    with emulated_cluster(2, tmp_path / "c") as c:
        c.run(["deepspeed", "--hostfile", str(c.hostfile), "--master_addr", "node1", ...])
    with local_slurm(tmp_path / "s") as s:
        s.sbatch(["launch/slurm.sbatch", "--out", "r.json"], env={"PROGRAM": "tests/toy_dist.py"})

and the same as pytest fixtures: ``emulated_cluster_factory`` (call it with the number of
nodes) and ``local_slurm_cluster``. Import them into a conftest or test module.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
EMULATE = REPO / "launch" / "emulate_cluster.sh"
SLURM_LOCAL = REPO / "launch" / "slurm_local.sh"
INSTALL_HINT = "run launch/install_cluster_deps.sh as root"

__all__ = [
    "ClusterUnavailable", "Cluster", "SlurmCluster", "emulated_cluster", "local_slurm", "require_root",
    "emulated_cluster_factory", "local_slurm_cluster", "run_bounded", "base_env",
]


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the emulated cluster (not root, packages missing)."""


REQUIRED = os.environ.get("ALEXNET_DIST_CLUSTER_TESTS") == "required"


def require_root(what: str) -> None:
    """Skip the calling test without root (fail where CI requires the cluster tests)."""
    _require([], f"this test needs root ({what})")


def _require(tools: Sequence[str],
             not_root: str = "cluster tests need root (network namespaces, sshd, munge, slurmd)") -> None:
    why = None
    if os.geteuid() != 0:
        why = not_root
    elif missing := [t for t in tools if shutil.which(t) is None and not Path(t).exists()]:
        why = f"missing {', '.join(missing)}: {INSTALL_HINT}"
    if why and REQUIRED:
        raise ClusterUnavailable(why)
    if why:
        pytest.skip(why)


def base_env() -> dict[str, str]:
    """This process's environment with its interpreter's bin/ first on PATH, so python,
    deepspeed and mpirun are the venv's even when pytest was started without activating it."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != venv_bin:
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    return env


def _source(env_sh: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` after ``. env_sh`` (bash does the expansion, exactly as a user's shell would)."""
    out = subprocess.run(["bash", "-c", '. "$0" && env -0', str(env_sh)], env=env,
                         capture_output=True, check=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def run_bounded(cmd: Sequence[str], *, env: dict[str, str], timeout: float,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` (stdout+stderr captured together) and kill its whole process group
    when it overruns ``timeout``: a launcher's children (pdsh, ssh, mpiexec) go too.
    Returns with ``returncode`` -9 and what it printed so far on timeout."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[run_bounded: killed after {timeout:.0f} s: {' '.join(map(str, cmd))}]"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _script(script: Path, *args: str | Path, env: dict[str, str], timeout: float = 120) -> str:
    res = run_bounded([script, *args], env=env, timeout=timeout)
    if res.returncode != 0:
        raise ClusterUnavailable(f"{script.name} {' '.join(map(str, args))} failed "
                                 f"(exit {res.returncode}):\n{res.stdout[-4000:]}")
    return res.stdout.strip().splitlines()[-1]


@dataclass
class Cluster:
    """A running emulated cluster: ``nodes`` (``node1`` ...), ``env`` (PATH with the
    cluster's ssh, PDSH_RCMD_TYPE=ssh, DS_ENV_FILE) and a DeepSpeed ``hostfile``
    (``node1 slots=2`` ...)."""

    workdir: Path
    nodes: list[str]
    env: dict[str, str]
    hostfile: Path

    def run(self, cmd: Sequence[str | Path], *, node: str | None = None, timeout: float = 240,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` from the repository root, on this machine (the "login node") or,
        with ``node``, inside that node's namespaces with the same env and cwd."""
        prefix = [EMULATE, "exec", self.workdir, node] if node else []
        return run_bounded([*prefix, *cmd], env={**self.env, **(extra_env or {})}, timeout=timeout)


@contextlib.contextmanager
def emulated_cluster(n_nodes: int, workdir: Path, slots: int = 2) -> Iterator[Cluster]:
    """``n_nodes`` nodes up for the ``with`` body, torn down afterwards whatever happens;
    ``slots``: ranks per node in the hostfile."""
    _require(["ip", "unshare", "nsenter", "ssh", "pdsh", "/usr/sbin/sshd"])
    workdir = Path(workdir)
    env = base_env()
    try:
        env_sh = Path(_script(EMULATE, "up", str(n_nodes), workdir, env={**env, "SLOTS": str(slots)}, timeout=90))
        cluster_env = _source(env_sh, env)
        yield Cluster(workdir, cluster_env["CLUSTER_NODES"].split(), cluster_env,
                      Path(cluster_env["CLUSTER_HOSTFILE"]))
    finally:
        run_bounded([EMULATE, "down", workdir], env=env, timeout=60)


_SLURM_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    """A running one-machine SLURM: ``env`` has SLURM_CONF; ``node`` is its only node."""

    workdir: Path
    env: dict[str, str]
    node: str
    jobs: list[str] = field(default_factory=list)

    def submit(self, args: Sequence[str | Path], *, env: dict[str, str] | None = None, time_limit_min: int = 5,
               log: Path | None = None) -> tuple[str, Path]:
        """``sbatch <args>`` without waiting: (job id, its output file); AssertionError if refused."""
        log = log or self.workdir / f"job-{len(self.jobs)}.out"
        res = run_bounded(["sbatch", "--parsable", f"--time={time_limit_min}", "-o", log, *args],
                          env={**self.env, **(env or {})}, timeout=30)
        assert res.returncode == 0, f"sbatch failed:\n{res.stdout}"
        job_id = res.stdout.strip().splitlines()[-1].split(";")[0]
        self.jobs.append(job_id)
        return job_id, log

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, Restarts, ...)."""
        out = run_bounded(["scontrol", "-o", "show", "job", job_id], env=self.env, timeout=10).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, log: Path, timeout: float = 240) -> tuple[int, str]:
        """Poll (every second; ``sbatch --wait`` backs off to 30 s between looks) until the job
        ends, at most ``timeout`` seconds: past that it is cancelled. Returns the job's exit
        status (-9 on timeout) and its output."""
        state, code, deadline = "", "", time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            state, code = fields.get("JobState", ""), fields.get("ExitCode", "")
            if state in _SLURM_DONE:
                break
            time.sleep(1)
        else:
            run_bounded(["scancel", job_id], env=self.env, timeout=30)
        rc = -9 if state not in _SLURM_DONE else (0 if state == "COMPLETED" else int(code.split(":")[0] or 0) or 1)
        text = log.read_text(errors="replace") if log.exists() else ""
        return rc, f"job {job_id}: {state or 'unknown'} exit {code}\n--- job log {log}:\n{text}"

    def sbatch(self, args: Sequence[str | Path], *, env: dict[str, str] | None = None,
               timeout: float = 240, log: Path | None = None) -> tuple[int, str]:
        """Submit ``sbatch <args>`` and wait until the job ends (:meth:`wait`)."""
        limit_min = max(1, int(timeout // 60) + 1)  # SLURM kills it too, should we not
        job_id, log = self.submit(args, env=env, time_limit_min=limit_min, log=log)
        return self.wait(job_id, log, timeout)

    def logs(self, lines: int = 30) -> str:
        """Tails of the daemons' logs, for failure messages."""
        parts = []
        for f in sorted((self.workdir / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


@contextlib.contextmanager
def local_slurm(workdir: Path) -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd up (node idle) for the ``with`` body, always stopped after."""
    _require(["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "setpriv"])
    workdir = Path(workdir)
    env = base_env()
    try:
        env_sh = Path(_script(SLURM_LOCAL, "up", workdir, env=env, timeout=120))
        slurm_env = _source(env_sh, env)
        node = run_bounded(["hostname", "-s"], env=env, timeout=10).stdout.strip()
        yield SlurmCluster(workdir, slurm_env, node)
    finally:
        run_bounded([SLURM_LOCAL, "down", workdir], env=env, timeout=90)


@pytest.fixture
def emulated_cluster_factory(tmp_path: Path):
    """Call with a node count (and slots per node); every cluster made is torn down after the test."""
    made = itertools.count()
    with contextlib.ExitStack() as stack:
        def make(n_nodes: int = 2, slots: int = 2) -> Cluster:
            return stack.enter_context(emulated_cluster(n_nodes, tmp_path / f"cluster{next(made)}", slots))
        yield make


@pytest.fixture
def local_slurm_cluster(tmp_path: Path):
    """A one-machine SLURM for this test."""
    with local_slurm(tmp_path / "slurm") as slurm:
        yield slurm
