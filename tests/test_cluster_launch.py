"""The multi-node launch paths, end to end on an emulated cluster (root, CI).

``tests/toy_dist.py`` stands in for ``train.py``: it finds its rank the trainer's way,
all-reduces and gathers hostnames, and rank 0 writes a JSON report. Each test proves a
launcher puts the right number of ranks on the right hosts:

* DeepSpeed's launcher over pdsh/ssh with a hostfile of two nodes;
* ``mpirun`` (MPICH hydra over ssh) across the two nodes, ranks from mpi4py;
* ``sbatch launch/slurm.sbatch`` on a one-machine SLURM (srun, and its DeepSpeed variant).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster import REPO, emulated_cluster_factory, local_slurm_cluster  # noqa: F401 (fixtures)

TOY = "tests/toy_dist.py"
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _report(path: Path, res: subprocess.CompletedProcess | str) -> dict:
    out = res if isinstance(res, str) else res.stdout
    assert path.exists(), f"no report at {path}; output:\n{out[-6000:]}"
    return json.loads(path.read_text())


def _check(report: dict, world: int, per_host: dict[str, int], source: str) -> None:
    assert report["world_size"] == world
    assert report["sum"] == world * (world + 1) / 2  # all_reduce of rank + 1 over every rank
    assert [r["rank"] for r in report["ranks"]] == list(range(world))
    assert Counter(r["host"] for r in report["ranks"]) == per_host
    assert {r["source"] for r in report["ranks"]} == {source}
    # Consecutive ranks share a node (tower pairs): local ranks 0..k-1 on each host.
    for host, k in per_host.items():
        assert sorted(r["local_rank"] for r in report["ranks"] if r["host"] == host) == list(range(k))


@pytest.mark.timeout(120)
def test_emulated_nodes_ssh_pdsh_and_teardown(emulated_cluster_factory):  # noqa: F811
    cluster = emulated_cluster_factory(2)
    res = cluster.run(["ssh", "node2", "hostname"], timeout=30)
    assert res.returncode == 0 and res.stdout.split() == ["node2"], res.stdout
    # From inside a node, by name, through that node's own /etc/hosts and ssh config.
    res = cluster.run(["ssh", "node2", "hostname"], node="node1", timeout=30)
    assert res.returncode == 0 and res.stdout.split() == ["node2"], res.stdout
    res = cluster.run(["pdsh", "-w", ",".join(cluster.nodes), "hostname"], timeout=30)
    assert res.returncode == 0, res.stdout
    assert sorted(res.stdout.splitlines()) == ["node1: node1", "node2: node2"], res.stdout

    state = (cluster.workdir / "cluster.state").read_text()
    netns = state.split('NETNS="')[1].split('"')[0].split()
    sshd_pids = [int((cluster.workdir / n / "pid").read_text()) for n in cluster.nodes]
    subprocess.run([REPO / "launch" / "emulate_cluster.sh", "down", cluster.workdir], check=True, timeout=60)
    subprocess.run([REPO / "launch" / "emulate_cluster.sh", "down", cluster.workdir], check=True, timeout=60)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not set(netns) & {line.split()[0] for line in listed.splitlines() if line.strip()}
    for pid in sshd_pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.timeout(300)
def test_deepspeed_hostfile_over_pdsh_ssh(emulated_cluster_factory, tmp_path):  # noqa: F811
    cluster = emulated_cluster_factory(2)
    out = tmp_path / "deepspeed.json"
    res = cluster.run(["deepspeed", "--hostfile", cluster.hostfile, "--master_addr", "node1",
                       TOY, "--out", out], timeout=240)
    assert res.returncode == 0, res.stdout[-6000:]
    _check(_report(out, res), 4, {"node1": 2, "node2": 2}, "env")


@pytest.mark.timeout(300)
def test_mpirun_across_nodes(emulated_cluster_factory, tmp_path):  # noqa: F811
    cluster = emulated_cluster_factory(2)
    out = tmp_path / "mpirun.json"
    res = cluster.run(["mpirun", "-hosts", "node1,node2", "-ppn", "2", "python", TOY, "--out", out],
                      timeout=240)
    assert res.returncode == 0, res.stdout[-6000:]
    _check(_report(out, res), 4, {"node1": 2, "node2": 2}, "mpi")


@pytest.mark.timeout(300)
def test_sbatch_srun(local_slurm_cluster, tmp_path):  # noqa: F811
    slurm = local_slurm_cluster
    out = tmp_path / "sbatch.json"
    rc, text = slurm.sbatch(["launch/slurm.sbatch", "--out", out], env={"PROGRAM": TOY}, timeout=240)
    assert rc == 0, text[-6000:] + "\n" + slurm.logs()
    report = _report(out, text)
    _check(report, 2, {slurm.node: 2}, "slurm")
    assert {r["master_addr"] for r in report["ranks"]} == {slurm.node}


@pytest.mark.timeout(300)
def test_sbatch_deepspeed_variant(local_slurm_cluster, tmp_path):  # noqa: F811
    slurm = local_slurm_cluster
    out = tmp_path / "sbatch-ds.json"
    rc, text = slurm.sbatch(["launch/slurm.sbatch", "--out", out],
                            env={"PROGRAM": TOY, "LAUNCHER": "deepspeed"}, timeout=240)
    assert rc == 0, text[-6000:] + "\n" + slurm.logs()
    _check(_report(out, text), 2, {slurm.node: 2}, "env")


@pytest.mark.timeout(300)
def test_deepspeed_dead_rank_fails_fast(emulated_cluster_factory, tmp_path):  # noqa: F811
    """A rank that dies on node2 ends the whole job with an error, well before the
    collective timeout: the others must not hang (gloo sees the closed connection)."""
    cluster = emulated_cluster_factory(2)
    out = tmp_path / "never.json"
    res = cluster.run(["deepspeed", "--hostfile", cluster.hostfile, "--master_addr", "node1",
                       TOY, "--out", out, "--fail-rank", "3", "--timeout", "200"], timeout=180)
    assert res.returncode not in (0, -9), res.stdout[-6000:]
    assert "failing on purpose" in res.stdout and not out.exists()
