"""Faults of a running job, on real processes through DeepSpeed's launcher (one node):

* ``kill -9`` of one rank mid-run: the other rank and the launcher exit non-zero well
  within 60 s, the survivor's error line names the dead rank (pid and host); resuming
  loses at most the steps since the last complete checkpoint and then gives the
  uninterrupted run's losses exactly (an incomplete newer checkpoint is ignored);
* SIGTERM to the launcher's process group (what a scheduler sends): a checkpoint at the
  next log boundary, every process gone, and the resumed run again equal to the
  uninterrupted one, without a lost step;
* ``kill -9`` of the rank writing a checkpoint (made deterministic: that rank's file is
  a FIFO, so the rank is stopped inside the write): the half-written checkpoint is never
  resumed, the previous complete one is;
* a disk that fills up during a checkpoint (run.dir on a small tmpfs): one clear line
  per rank, the previous checkpoint intact and loadable.

The interrupted jobs run with ``train.max_steps`` larger than the reference's: with
``train.schedule=constant`` nothing of the training depends on it, and a job that is
still running when the fault comes is what these tests need.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet_dist.checkpoint import Checkpoints, merged_model_state
from alexnet_dist.distributed import free_port
from tests.launch import BIN, REPO
from tests.reliability import (
    FAULT_SETS, Job, check, close, dataset_cache, error_lines, losses, metric_steps,
    reference_run, set_args, train, wait_for_ranks, wait_for_steps, wait_until, wait_until_gone,
)

STEPS = 12  # the reference run; faults come at step 3 or later
LONG = "train.max_steps=1000"  # an interrupted job never gets there
EVERY = 2  # run.checkpoint_every in FAULT_SETS
DEADLINE = 60.0  # seconds: the promise for a dead rank


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return dataset_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run every resumed run must reproduce."""
    return reference_run(tmp_path_factory, "deepspeed", 2, *FAULT_SETS, f"train.max_steps={STEPS}")


def _assert_resumes_like_the_reference(run: Path, cache: Path, reference: Path, step: int) -> None:
    """Restarting the job in ``run`` resumes from ``step`` and ends with the reference's losses."""
    result = check(train("deepspeed", 2, run, *FAULT_SETS, f"train.max_steps={STEPS}", cache=cache, timeout=300))
    m = re.search(r"resumed from step (\d+)", result.stdout)
    assert m and int(m.group(1)) == step, result.stdout[-3000:]
    close(losses(run), losses(reference), rel=1e-6)


def _kill_rank(job: Job, rank: int) -> int:
    ranks = wait_for_ranks(2, launcher_pid=job.pid)
    pid = ranks[rank].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def _assert_fails_fast_naming(job: Job, dead_rank: int, dead_pid: int, killed_at: float) -> str:
    """The launcher exits non-zero and every process of the job is gone within DEADLINE;
    the survivors' error lines name the dead rank with its pid."""
    rc = job.wait(DEADLINE)
    wait_until_gone(job.group_alive, killed_at, DEADLINE)
    out = job.output()
    assert rc != 0, out[-4000:]
    assert time.monotonic() - killed_at < DEADLINE
    errors = error_lines(out)
    survivors = {int(m.group(1)) for line in errors if (m := re.match(r"error \[rank (\d+)/", line))}
    assert survivors == {1 - dead_rank}, out[-4000:]
    for line in errors:
        assert re.search(rf"rank {dead_rank} \(pid {dead_pid} on \S+\) is gone", line), line
    return out


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(420)
def test_kill_9_of_a_rank_fails_fast_naming_it_and_resume_loses_at_most_the_steps_since_the_checkpoint(
        reference, cache, tmp_path):
    run = tmp_path / "run"
    job = Job.train("deepspeed", 2, run, cache, *FAULT_SETS, LONG)
    try:
        wait_for_steps(run)
        killed_at = time.monotonic()
        pid = _kill_rank(job, 1)
        _assert_fails_fast_naming(job, 1, pid, killed_at)
    finally:
        job.kill()

    last_logged = max(metric_steps(run))
    newest = Checkpoints(run).newest()
    assert newest is not None
    done = int(newest.name.removeprefix("step"))
    assert last_logged - done <= EVERY, (last_logged, done)
    # A save cut off later than that (kill -9 during a save) leaves a directory without
    # COMPLETE, here made on purpose with a truncated file: it must be passed over.
    partial = newest.parent / Checkpoints.tag(done + EVERY)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(newest, partial)
    (partial / "COMPLETE").unlink()
    (partial / "meta.json").unlink()
    model = partial / "tower1.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])

    _assert_resumes_like_the_reference(run, cache, reference, done)


def _stopped_by_sigterm(launcher: str, run: Path, cache: Path) -> tuple[str, int]:
    """A long 2-rank job under ``launcher``, SIGTERM to its process group once it trains (what
    a scheduler sends), every process gone within DEADLINE: (its output, the step it
    checkpointed at)."""
    job = Job.train(launcher, 2, run, cache, *FAULT_SETS, LONG)
    try:
        wait_for_steps(run)
        wait_for_ranks(2, launcher_pid=job.pid)
        os.killpg(job.pid, signal.SIGTERM)
        sent = time.monotonic()
        job.wait(DEADLINE)
        wait_until_gone(job.group_alive, sent, DEADLINE)
    finally:
        job.kill()
    out = job.output()
    m = re.search(r"stop requested: checkpoint at step (\d+), then exit", out)
    assert m, out[-4000:]
    return out, int(m.group(1))


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(420)
def test_sigterm_to_the_launcher_group_checkpoints_then_exits_and_resume_continues(reference, cache, tmp_path):
    """What a scheduler does on preemption or ``scancel``. DeepSpeed's launcher forwards
    SIGTERM to its ranks and SIGKILLs them 30 s later; the ranks stop at the next log
    boundary (run.log_every=1 here), checkpoint, and exit."""
    run = tmp_path / "run"
    out, stopped = _stopped_by_sigterm("deepspeed", run, cache)
    assert not error_lines(out), out[-4000:]
    assert Checkpoints(run).newest().name == Checkpoints.tag(stopped)
    assert max(metric_steps(run)) == stopped  # nothing trained past the checkpoint
    assert stopped < STEPS, "the job ran too far before SIGTERM arrived for the resume to be tested"

    _assert_resumes_like_the_reference(run, cache, reference, stopped)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(420)
def test_kill_9_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(reference, cache, tmp_path):
    """Rank 1 is killed inside its write of step 4's checkpoint: its file is a FIFO the test
    holds open and never drains, so the rank stops in the write, deterministically."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    # Start from the reference's step 2 (same config: the job resumes from it).
    shutil.copytree(reference / "checkpoints" / Checkpoints.tag(2), ckpts / Checkpoints.tag(2))
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:2]))
    target = ckpts / Checkpoints.tag(4) / "tower1.pt"
    target.parent.mkdir()
    os.mkfifo(target)
    reader = os.open(target, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer's open() succeed
    job = Job.train("deepspeed", 2, run, cache, *FAULT_SETS, LONG)
    written = b""
    try:
        wait_until(lambda: select.select([reader], [], [], 0)[0], 240, "rank 1 to start writing step 4")
        killed_at = time.monotonic()
        pid = _kill_rank(job, 1)
        _assert_fails_fast_naming(job, 1, pid, killed_at)
        while chunk := _read_available(reader):
            written += chunk
    finally:
        os.close(reader)
        job.kill()
    assert 0 < len(written) < 4 << 20  # cut off inside the write (a pipe holds 64 KiB)
    target.unlink()
    target.write_bytes(written)  # what a writer killed half way leaves behind
    assert not (target.parent / "COMPLETE").exists()
    assert Checkpoints(run).newest().name == Checkpoints.tag(2)

    _assert_resumes_like_the_reference(run, cache, reference, 2)


def _read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(420)
def test_full_disk_while_checkpointing_is_one_clear_line_and_the_previous_checkpoint_survives(
        reference, cache, tmp_path):
    step2 = reference / "checkpoints" / Checkpoints.tag(2)
    size = sum(f.stat().st_size for f in step2.iterdir())
    # Room for one checkpoint (and config, metrics), not for two.
    limit = (int(size * 1.5) // 4096 + 1) * 4096
    run = tmp_path / "small-disk"
    run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(run)], check=True)
    try:
        result = train("deepspeed", 2, run, *FAULT_SETS, f"train.max_steps={STEPS}", cache=cache, timeout=300)
        out = result.stdout + result.stderr
        assert result.returncode != 0, out[-4000:]
        errors = error_lines(out)
        assert errors, out[-4000:]
        for line in errors:
            assert "no space left on device" in line and f"{Checkpoints.tag(2)} is intact" in line, line
        newest = Checkpoints(run).newest()
        assert newest is not None and newest.name == Checkpoints.tag(2)
        state, meta = merged_model_state(newest)
        want, _ = merged_model_state(step2)
        assert meta["step"] == 2 and state.keys() == want.keys()
        assert all(torch.equal(state[k], want[k]) for k in want)
    finally:
        subprocess.run(["umount", "-l", str(run)], check=False)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_hung_rank_makes_the_other_fail_after_the_collective_timeout_naming_it(cache, tmp_path):
    """SIGSTOP: the rank is alive but silent, so no connection closes. Its partner must give
    up after run.collective_timeout_s (10 s here) in whichever group it waits, tower pair
    and data-parallel groups included, and say which rank did not answer."""
    run = tmp_path / "run"
    job = Job.train("deepspeed", 2, run, cache, *FAULT_SETS, LONG, "run.collective_timeout_s=10")
    try:
        wait_for_steps(run)
        ranks = wait_for_ranks(2, launcher_pid=job.pid)
        hung, survivor = ranks[1], ranks[0]
        os.kill(hung.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()

        def survivor_gone() -> bool:
            try:
                return survivor.status() == "zombie"
            except Exception:  # psutil.NoSuchProcess: reaped
                return True

        wait_until(survivor_gone, 50, "rank 0 to give up on the stopped rank")
        waited = time.monotonic() - stopped_at
    finally:
        job.kill()  # SIGKILL ends the stopped rank too (DeepSpeed's launcher would, 30 s later)
    out = job.output()
    assert 10 <= waited < 10 + 5 + 15, out[-4000:]  # the timeout, the survivors' report window, slack
    errors = error_lines(out)
    assert len(errors) == 1 and errors[0].startswith("error [rank 0/2]"), out[-4000:]
    assert re.search(rf"rank 1 \(pid {hung.pid} on \S+\) did not answer", errors[0]), errors[0]
    assert "Timed out" in errors[0]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_torchrun_restarts_a_job_whose_rank_was_killed_and_it_resumes_with_the_uninterrupted_losses(
        reference, cache, tmp_path):
    """torchrun keeps one store for every restart of the job: the restarted ranks must not
    read what the first start left there (gloo's addresses of dead ranks), and must resume
    from the newest complete checkpoint by themselves."""
    run = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nnodes=1:1", "--nproc-per-node=2", "--max-restarts=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(REPO / "train.py"),
           *set_args(run, cache, *FAULT_SETS, f"train.max_steps={STEPS}")]
    job = Job.start(cmd, tmp_path / "job.log")
    try:
        wait_for_steps(run)
        _kill_rank(job, 1)
        assert job.wait(300) == 0, job.tail()
    finally:
        job.kill()
    resumed = int(re.search(r"resumed from step (\d+)", job.output())[1])
    assert resumed >= EVERY and metric_steps(run) == list(range(1, STEPS + 1))
    close(losses(run), losses(reference), rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_sigterm_under_torchrun_and_mpirun_checkpoints_then_exits(launcher, cache, tmp_path):
    run = tmp_path / "run"
    out, stopped = _stopped_by_sigterm(launcher, run, cache)
    assert Checkpoints(run).newest().name == Checkpoints.tag(stopped) and max(metric_steps(run)) == stopped
    assert not error_lines(out), out[-4000:]


# ---------------------------------------------------------------- alexnet_dist.faults on its own (fast)

_CHILD = r"""
import sys
from alexnet_dist.faults.relay import guard_output
guard_output(sys.argv[1], rank=3)
print("before", flush=True)
sys.stdin.readline()  # the test closes our stdout's reader, then says go
for i in range(200):
    print(f"after {i}", flush=True)
sys.stderr.write("done\n")
"""


@pytest.mark.parametrize("relay", [True, False])
def test_a_rank_outlives_the_launcher_closing_its_output_only_with_the_relay(relay, tmp_path):
    """pdsh/ssh killed on SIGTERM close the ranks' stdout: without the relay the next print
    is EPIPE and the rank dies before its checkpoint; with it the rank goes on and what it
    says lands in run.dir/logs/rank<r>.log."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if not relay:
        env["ALEXNET_DIST_NO_RELAY"] = "1"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"before\n"
        child.stdout.close()  # the launcher's end goes away
        child.stdin.write(b"go\n")
        child.stdin.close()
        rc = child.wait(timeout=60)
    finally:
        child.kill()
    stderr = child.stderr.read().decode()
    log = tmp_path / "logs" / "rank3.log"
    if relay:
        assert rc == 0, stderr
        assert "after 199" in log.read_text()
        assert "done" in stderr or "done" in log.read_text()
    else:
        assert rc != 0 and "BrokenPipeError" in stderr and not log.exists()


def test_describe_failure_says_no_space_left_and_names_the_checkpoints(tmp_path, monkeypatch):
    import errno

    from alexnet_dist import faults

    for name, complete in (("step00000002", True), ("step00000004", False)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if complete:
            (tmp_path / "checkpoints" / name / "COMPLETE").write_text("")
    context = faults.FaultContext(run_dir=str(tmp_path))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints/step00000004/x.pt"))
    line = faults.describe_failure(full, context)
    assert line.startswith("no space left on device: could not write checkpoint step00000004")
    assert "the newest complete checkpoint step00000002 is intact" in line and "\n" not in line
    # torch.save's own words for a full disk; a full disk only when the disk is nearly full
    torch_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(faults.disk, "_free_bytes", lambda path: 0)
    assert faults.describe_failure(torch_write, context).startswith("no space left on device")
    monkeypatch.setattr(faults.disk, "_free_bytes", lambda path: 10 << 30)
    assert faults.describe_failure(torch_write, context) is None


def test_describe_failure_leaves_other_errors_alone_and_report_failure_reraises_them():
    from alexnet_dist import faults

    assert faults.describe_failure(ValueError("a bug")) is None
    assert faults.describe_failure(KeyError("x")) is None
    with pytest.raises(ZeroDivisionError):
        faults.report_failure(ZeroDivisionError("division by zero"), "[rank 0/1]")
