"""The real train.py on an emulated 2-node cluster (network namespaces + sshd, root, CI)
and on a one-machine SLURM:

* ``deepspeed --hostfile`` (pdsh over ssh) and ``mpirun`` across node1 and node2, two
  ranks each, give the losses of the same job on one node (``deepspeed --num_gpus 4``);
* ``sbatch launch/slurm.sbatch`` trains on 2 tasks with the losses of ``deepspeed --num_gpus 2``;
* a rank killed on node2: every rank on both nodes and the launcher stop within 60 s, and
  the survivors' lines name it (node1's ranks learn it from node2's survivor, through the store);
* SIGTERM to the pdsh launcher's process group: DeepSpeed's runner kills pdsh (the ssh
  sessions, the ranks' stdout, go with it) and pkills the node launchers, which pass
  SIGTERM on; the ranks must still checkpoint (their output relay keeps them alive);
* a hostfile naming a host that cannot be reached after a good one: the ranks that did
  start stop after run.collective_timeout_s with a line saying ranks never arrived.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from alexnet_dist.checkpoint import Checkpoints
from alexnet_dist.distributed import free_port
from tests.cluster import (  # noqa: F401 (fixtures)
    EMULATE, REPO as REPO_ROOT, emulated_cluster, emulated_cluster_factory, local_slurm_cluster, run_bounded,
)
from tests.reliability import (
    EXACT, FAULT_SETS, Job, close, dataset_cache, error_lines, losses, metric_steps, rank_processes,
    reference_run, set_args, wait_for_ranks, wait_for_steps, wait_until, wait_until_gone,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 6
SETS = [*EXACT, f"train.max_steps={STEPS}"]
SLURM_STEPS = 12  # the same job as tests/test_faults.py's reference: made once per session


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return dataset_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """node1 and node2, 2 slots each, shared by this module's tests (torn down after)."""
    # OMP_NUM_THREADS goes into the .deepspeed_env the nodes' ranks get.
    with _environ(OMP_NUM_THREADS="1"), emulated_cluster(2, tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory, "deepspeed", 4, *SETS)


def _deepspeed(cluster, hostfile: Path, run: Path, cache: Path, *sets: str) -> list[str]:
    return ["deepspeed", "--hostfile", hostfile, "--master_addr", "node1", "--master_port", str(free_port()),
            "train.py", *set_args(run, cache, *sets)]


def _env(cluster) -> dict[str, str]:
    return {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(400)
def test_deepspeed_hostfile_on_two_nodes_equals_one_node(cluster, one_node, cache, tmp_path):
    run = tmp_path / "run"
    res = cluster.run(_deepspeed(cluster, cluster.hostfile, run, cache, *SETS), timeout=300,
                      extra_env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-6000:]
    spawned = {node: len(re.findall(rf"^{node}: .*process \d+ spawned", res.stdout, re.M)) for node in cluster.nodes}
    assert spawned == {"node1": 2, "node2": 2}, res.stdout[-4000:]
    close(losses(run), losses(one_node), rel=1e-4)


@pytest.mark.timeout(400)
def test_mpirun_on_two_nodes_equals_one_node(cluster, one_node, cache, tmp_path):
    run = tmp_path / "run"
    res = cluster.run(["mpirun", "-hosts", ",".join(cluster.nodes), "-ppn", "2", "python", "train.py",
                       *set_args(run, cache, *SETS)], timeout=300, extra_env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-6000:]
    close(losses(run), losses(one_node), rel=1e-4)


@pytest.mark.timeout(500)
def test_sbatch_trains_on_two_tasks_like_deepspeed_two_ranks(local_slurm_cluster, tmp_path_factory, cache,  # noqa: F811
                                                             tmp_path):
    sets = [*FAULT_SETS, f"train.max_steps={SLURM_STEPS}"]
    reference = reference_run(tmp_path_factory, "deepspeed", 2, *sets)
    run = tmp_path / "run"
    rc, text = local_slurm_cluster.sbatch(["launch/slurm.sbatch", *set_args(run, cache, *sets)],
                                          env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert rc == 0, text[-6000:] + "\n" + local_slurm_cluster.logs()
    assert "2 tasks" in text, text[-3000:]
    close(losses(run), losses(reference), rel=1e-4)


def _start_long_job(cluster, run: Path, cache: Path, tmp_path: Path) -> Job:
    """A 2-node x 2-slot job over pdsh that would train far longer than any test waits."""
    return Job.start(_deepspeed(cluster, cluster.hostfile, run, cache, *FAULT_SETS, "train.max_steps=1000"),
                     tmp_path / "job.log", env=_env(cluster))


@pytest.mark.timeout(300)
def test_kill_9_of_a_rank_on_node2_stops_both_nodes_naming_it(cluster, cache, tmp_path):
    run = tmp_path / "run"
    job = _start_long_job(cluster, run, cache, tmp_path)
    try:
        wait_for_steps(run)
        ranks = wait_for_ranks(4, run_dir=run)
        victim = ranks[3]
        assert victim.pid != ranks[0].pid
        killed_at = time.monotonic()
        victim.kill()
        rc = job.wait(60)
        wait_until_gone(lambda: rank_processes(run_dir=run), killed_at, 60)
    finally:
        job.kill()
    out = job.output()
    assert rc != 0, out[-4000:]
    errors = error_lines(out)
    survivors = {int(m.group(1)) for line in errors if (m := re.match(r"error \[rank (\d+)/", line))}
    assert survivors == {0, 1, 2}, out[-4000:]
    for line in errors:
        assert re.search(rf"rank 3 \(pid {victim.pid} on node2\) is gone", line), line


@pytest.mark.timeout(300)
def test_sigterm_to_the_pdsh_launcher_checkpoints_then_every_node_exits(cluster, cache, tmp_path):
    run = tmp_path / "run"
    job = _start_long_job(cluster, run, cache, tmp_path)
    try:
        wait_for_steps(run)
        wait_for_ranks(4, run_dir=run)
        os.killpg(job.pid, signal.SIGTERM)
        sent = time.monotonic()
        job.wait(60)
        wait_until_gone(lambda: rank_processes(run_dir=run), sent, 60)
    finally:
        job.kill()
    # The launcher's ssh sessions are gone by the time the ranks stop: what rank 0 said
    # after that is in run.dir/logs (the relay's fallback), the rest in the job's output.
    said = job.output() + "".join(p.read_text() for p in (run / "logs").glob("rank*.log"))
    m = re.search(r"stop requested: checkpoint at step (\d+), then exit", said)
    assert m, said[-4000:]
    stopped = int(m.group(1))
    newest = Checkpoints(run).newest()
    assert newest is not None and newest.name == Checkpoints.tag(stopped), said[-4000:]
    assert sorted(p.name for p in newest.glob("*.pt")) == ["state.pt", "tower0.pt", "tower1.pt"]
    assert max(metric_steps(run)) == stopped


@pytest.mark.timeout(300)
def test_a_hostfile_naming_an_unreachable_second_host_stops_without_hanging(cluster, cache, tmp_path):
    """node1 is fine, nohost.invalid is not: pdsh says so, node1's two ranks wait for the
    other two at the rendezvous for run.collective_timeout_s (8 s), then stop with a clear line.
    (The name never reaches DNS: an ssh config maps it to a closed port on loopback.)"""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnohost.invalid slots=2\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    config = tmp_path / "ssh_config"
    config.write_text("Host nohost.invalid\n  HostName 127.0.0.1\n  Port 1\n\n"
                      + (cluster.workdir / "ssh" / "config").read_text())
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {config} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    env = {**_env(cluster), "PATH": f"{bin_dir}:{cluster.env['PATH']}"}
    run = tmp_path / "run"
    started = time.monotonic()
    job = Job.start(_deepspeed(cluster, hostfile, run, cache, *EXACT, "run.collective_timeout_s=8"),
                    tmp_path / "job.log", env=env)
    try:
        rc = job.wait(120)
    finally:
        job.kill()
    out = job.output()
    assert rc != 0, out[-4000:]
    assert time.monotonic() - started < 120
    # pdsh names the host by its first label.
    assert re.search(r"nohost(\.invalid)?: ssh: connect to host 127\.0\.0\.1 port 1: Connection refused", out), \
        out[-4000:]
    # Both of node1's ranks time out at about the same moment; DeepSpeed's node launcher
    # SIGKILLs the other as soon as one exits, so one line or both (CI has seen each).
    errors = error_lines(out)
    ranks = {line.split("]")[0] for line in errors}
    assert ranks and ranks <= {"error [rank 0/4", "error [rank 1/4"}, out[-4000:]
    assert all("reached the rendezvous at node1:" in line for line in errors), out[-4000:]
    assert all("only 2 of 4 ranks reached" in line for line in errors if line.startswith("error [rank 0/4")), out[-4000:]


ELASTIC_STEPS = 150  # node1 alone must still be training when node2 comes back
# Losses equal to the uninterrupted run's past the first resume; later, a learning network
# amplifies the layouts' different float sums (3e-4 apart by step 28 in one run).
EXACT_STEPS = 20
# 16 images per step whatever the nodes: 2 micro batches of 4 on two replicas, 4 on one.
ELASTIC_SETS = [*EXACT, "train.global_batch_size=16", "train.micro_batch_size=4", "run.checkpoint_every=2",
                "run.keep_last=50", "run.collective_timeout_s=30", f"train.max_steps={ELASTIC_STEPS}"]


def _elastic_agent(cluster, node: str, port: int, run: Path, cache: Path, log: Path) -> Job:
    """torchrun on ``node``: 2 ranks, elastic over 1 to 2 nodes, rendezvous on node1, as the
    README says to run it (without the shared store a node that comes back can join)."""
    return Job.start([EMULATE, "exec", cluster.workdir, node, "torchrun", "--nnodes=1:2", "--nproc-per-node=2",
                      "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint=node1:{port}", "--rdzv-id=lost",
                      "train.py", *set_args(run, cache, *ELASTIC_SETS)], log,
                     env={**_env(cluster), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})


def _kill_tree(job: Job) -> None:
    """SIGKILL a node's launcher and everything under it: the node is lost."""
    import psutil

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(job.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
    job.proc.wait()


@pytest.mark.timeout(900)
def test_torchrun_elastic_finishes_on_node1_after_node2_is_lost_and_takes_node2_back(
        cluster, cache, tmp_path_factory, tmp_path):
    """Every process of node2 killed mid-run: node1's ranks fail on the broken connection,
    torchrun restarts them with the replica that is left, they resume from the newest
    checkpoint and go on (16 images per step throughout, so the losses are the
    uninterrupted 4-rank run's). node2's agent started again joins: torchrun stops node1's
    ranks (SIGTERM: they checkpoint) and restarts all four, which resume from there."""
    reference = reference_run(tmp_path_factory, "deepspeed", 4, *ELASTIC_SETS)
    run, port = tmp_path / "run", free_port()
    node1 = _elastic_agent(cluster, "node1", port, run, cache, tmp_path / "node1.log")
    node2 = _elastic_agent(cluster, "node2", port, run, cache, tmp_path / "node2.log")
    try:
        wait_for_steps(run, 4)
        _kill_tree(node2)
        lost_at = max(metric_steps(run))
        wait_until(lambda: "resuming a checkpoint of 4 ranks on 2 ranks" in node1.output(), 300,
                   "node1 to resume alone")
        wait_for_steps(run, len(metric_steps(run)) + 1)  # node1 alone trains on
        node2 = _elastic_agent(cluster, "node2", port, run, cache, tmp_path / "node2-again.log")
        wait_until(lambda: "resuming a checkpoint of 2 ranks on 4 ranks" in node1.output(), 300,
                   "node2 to rejoin")
        assert node1.wait(500) == 0, node1.tail()
        assert node2.wait(120) == 0, node2.tail()
    finally:
        node1.kill()
        _kill_tree(node2)
    assert "resuming a checkpoint of 2 ranks on 4 ranks: 2 replicas instead of 1" in node1.output()
    assert metric_steps(run) == list(range(1, ELASTIC_STEPS + 1)), (lost_at, metric_steps(run))
    close(losses(run)[:EXACT_STEPS], losses(reference)[:EXACT_STEPS], rel=1e-4)


REQUEUE_STEPS = 200  # enough that each allocation is still training when the test warns it


@pytest.mark.timeout(900)
def test_sbatch_warned_of_its_time_limit_checkpoints_requeues_and_finishes_in_three_allocations(
        local_slurm_cluster, tmp_path_factory, cache, tmp_path):  # noqa: F811
    """What ``#SBATCH --signal=B:USR1@300`` does before the time limit, sent at chosen steps
    (``scancel --batch --signal=USR1``) so the test is exact: the ranks checkpoint and
    stop, the script requeues the job, the next allocation resumes; the third finishes
    and is not requeued. The losses are the uninterrupted run's."""
    sets = [*FAULT_SETS, f"train.max_steps={REQUEUE_STEPS}"]
    reference = reference_run(tmp_path_factory, "deepspeed", 2, *sets)
    run, slurm = tmp_path / "run", local_slurm_cluster
    job_id, log = slurm.submit(["launch/slurm.sbatch", *set_args(run, cache, *sets)], env={"OMP_NUM_THREADS": "1"},
                               time_limit_min=30)  # SLURM's own signal (5 min before the limit) never comes
    for allocation in (1, 2):
        wait_for_steps(run, len(metric_steps(run)) + 3)  # this allocation trains
        run_bounded(["scancel", "--batch", "--signal=USR1", job_id], env=slurm.env, timeout=30)
        wait_until(lambda: log.read_text().count("requeued (exit status 0") == allocation, 120,
                   f"allocation {allocation} to checkpoint and requeue")
    rc, text = slurm.wait(job_id, log, timeout=600)
    assert rc == 0, text[-6000:] + "\n" + slurm.logs()
    assert [f"allocation {n}:" in text for n in (1, 2, 3, 4)] == [True, True, True, False], text[-4000:]
    assert text.count("resumed from step") == 2 and text.count("requeued (exit") == 2, text[-4000:]
    assert metric_steps(run) == list(range(1, REQUEUE_STEPS + 1))
    close(losses(run), losses(reference), rel=1e-6)


def _lose_node(cluster, node: str) -> None:
    """Kill every process of ``node`` (its sshd, sessions and ranks): it is gone, and ssh to
    it is refused from now on."""
    state = dict(line.split("=", 1) for line in (cluster.workdir / "cluster.state").read_text().splitlines())
    netns = state["NETNS"].strip('"').split()[cluster.nodes.index(node)]
    pids = run_bounded(["ip", "netns", "pids", netns], env=cluster.env, timeout=10).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.mark.timeout(600)
def test_keep_running_restarts_a_deepspeed_hostfile_job_on_the_nodes_left(
        emulated_cluster_factory, cache, tmp_path_factory, tmp_path):  # noqa: F811
    """DeepSpeed's launcher has no restart: launch/keep_running.sh starts the job again on
    the hosts that still answer ssh, and train.py resumes there (a fresh cluster: node2
    does not come back)."""
    reference = reference_run(tmp_path_factory, "deepspeed", 4, *ELASTIC_SETS)
    cluster = emulated_cluster_factory(2)
    run = tmp_path / "run"
    job = Job.start([REPO_ROOT / "launch" / "keep_running.sh", cluster.hostfile, "--master_port", str(free_port()),
                     "--", "train.py", *set_args(run, cache, *ELASTIC_SETS)], tmp_path / "job.log",
                    env={**_env(cluster), "RETRY_DELAY": "1"})
    try:
        wait_for_steps(run, 4)
        _lose_node(cluster, "node2")
        assert job.wait(400) == 0, job.tail()
    finally:
        job.kill()
    out = job.output()
    assert "node2 does not answer ssh: left out of this start" in out and "start 2 on node1, master node1" in out
    assert "resuming a checkpoint of 4 ranks on 2 ranks: 1 replica instead of 2" in out, out[-4000:]
    assert metric_steps(run) == list(range(1, ELASTIC_STEPS + 1))
    close(losses(run)[:EXACT_STEPS], losses(reference)[:EXACT_STEPS], rel=1e-4)
