"""Faults and odd inputs that once gave a wrong result with exit 0, or a run that could not
resume: each now ends in one clear line or a safe recovery (real processes, CPU)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from alexnet_dist.distributed import free_port
from data_pipeline import DataError, list_images
from data_pipeline.photos import make_benchmark_photos
from tests.launch import REPO, SMALL, check, command, records, train
from tests.reliability import Job, error_lines, metric_steps, set_args, wait_for_steps, wait_until


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _photos(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    make_benchmark_photos(str(root), classes * per_class, size=(80, 60), classes=classes)
    return root


def _one_error(result: subprocess.CompletedProcess, code: int, says: str) -> str:
    errors = error_lines(result.stderr)
    assert result.returncode == code and len(errors) == 1 and says in errors[0], (result.returncode, result.stderr)
    return errors[0]


def _all_json(run: Path) -> list[dict]:
    """Every line of metrics.jsonl as strict JSON (NaN and Infinity refused)."""
    def refuse(name):
        raise ValueError(f"{name} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_symlink_loop_in_a_class_folder_is_refused_in_one_line(tmp_path, cache):
    data = _photos(tmp_path / "data")
    os.symlink("..", data / "class0" / "up")
    _one_error(train("python", 1, tmp_path / "run", f"data.train_dir={data}", "train.max_steps=1", cache=cache),
               2, "class0/up is a link back to a folder above it (a loop)")


def test_a_file_reached_twice_is_listed_once_and_one_shared_by_two_classes_is_refused(tmp_path):
    data = _photos(tmp_path / "data")
    first = data / "class0" / "photo000000.jpg"
    (data / "class0" / "sub").mkdir()
    os.symlink(first, data / "class0" / "sub" / "again.jpg")
    assert len(list_images(data)) == 24  # the link is the same real file
    os.symlink(first, data / "class1" / "borrowed.jpg")
    with pytest.raises(DataError, match="are the same file in two classes"):
        list_images(data)


def test_validation_labels_follow_the_class_names_not_their_position(tmp_path, cache):
    data = _photos(tmp_path / "train")
    shutil.copytree(data, tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "class0")  # position 0 in val is now class1
    val = list_images(tmp_path / "val", list_images(data).classes)
    assert set(val.labels.tolist()) == {1, 2} and val.missing_classes == ["class0"]
    result = check(train("python", 1, tmp_path / "run", f"data.train_dir={data}", f"data.val_dir={tmp_path / 'val'}",
                         "train.max_steps=2", cache=cache))
    assert "has no folder for 1 of the 3 training classes (class0)" in result.stdout
    os.rename(tmp_path / "val" / "class2", tmp_path / "val" / "renamed")
    _one_error(train("python", 1, tmp_path / "run2", f"data.train_dir={data}", f"data.val_dir={tmp_path / 'val'}",
                     "train.max_steps=2", cache=cache), 2, "class folders the training set does not: renamed")
    _one_error(train("python", 1, tmp_path / "run3", f"data.train_dir={data}", "model.num_classes=2",
                     "train.max_steps=2", cache=cache), 2, "model.num_classes=2 is fewer than the 3 class folders")


def test_a_diverging_run_stops_naming_the_step_and_writes_no_nan(tmp_path, cache):
    _one_error(train("python", 1, tmp_path / "inf", "train.lr=.inf", cache=cache), 2,
               "train.lr must be a finite number; got inf")
    run = tmp_path / "run"
    line = _one_error(train("deepspeed", 2, run, "train.lr=1000", "train.grad_clip=0", "train.max_steps=30",
                            "run.checkpoint_every=0",
                            cache=cache), 3, "training diverged")
    assert "the loss is nan at step" in line or "the loss is inf at step" in line, line
    lines = _all_json(run)  # strict: a NaN would not parse
    assert not [r for r in lines if r.get("split") == "val"]  # nothing was evaluated on a diverged network
    assert not (run / "checkpoints" / "best").exists()


def test_resume_repairs_a_cut_off_metrics_line_and_skips_a_damaged_checkpoint(tmp_path, cache):
    run = tmp_path / "run"
    sets = ["data.augment=false", "model.dropout=0", "run.checkpoint_every=2", "run.keep_last=5"]
    check(train("python", 1, run, *sets, "train.max_steps=4", cache=cache))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "epoch": 1, "lo')  # what a full disk leaves
    newest = run / "checkpoints" / "step00000004"
    model = newest / "tower1.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a truncated file
    resumed = check(train("python", 1, run, *sets, "train.max_steps=6", cache=cache))
    assert "checkpoint step00000004 is damaged" in resumed.stdout and "trying the one before it" in resumed.stdout
    assert "resumed from step 2" in resumed.stdout and "dropped 1 damaged line" in resumed.stdout
    assert [r["step"] for r in _all_json(run) if "split" not in r] == [1, 2, 3, 4, 5, 6]
    # a resume that is refused leaves the run's config.yaml as it was
    config_before = (run / "config.yaml").read_text()
    refused = train("python", 1, run, *sets, "model.width_mult=0.25", "train.max_steps=8", cache=cache)
    assert refused.returncode == 2 and "was made with width_mult=0.125" in refused.stderr
    assert (run / "config.yaml").read_text() == config_before


def test_a_second_job_on_a_run_dir_in_use_is_refused(tmp_path, cache):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "lock", "a+") as held:  # what a running job's rank 0 holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        _one_error(train("python", 1, run, "train.max_steps=1", cache=cache), 2,
                   "is in use by another job (pid 4242 on elsewhere)")
    check(train("python", 1, run, "train.max_steps=1", cache=cache))  # the lock is free again: it runs


def test_ctrl_c_checkpoints_and_exits_like_sigterm(tmp_path, cache):
    run = tmp_path / "run"
    args = []
    for s in [*SMALL, f"run.dir={run}", f"data.cache_dir={cache}", "train.max_steps=2000", "run.checkpoint_every=0"]:
        args += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    job = subprocess.Popen(command("python", 1, args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for_steps(run, 3)
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "stop requested: checkpoint at step" in out, (out[-2000:], err[-2000:])
    steps = [r["step"] for r in records(run)]
    assert (run / "checkpoints" / f"step{steps[-1]:08d}" / "COMPLETE").is_file()
    assert f"stopped at step {steps[-1]} of " in out


def _listening(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp"))


# A stand-in for a node launcher (its name makes it one to the ranks): starts a job's ranks
# on MASTER_PORT, each once its gate file exists, and exits with the worst status.
_GATED_LAUNCHER = """
import json, os, subprocess, sys, time
spec = json.loads(sys.argv[1])
procs = []
for rank, gate in spec["ranks"]:
    while gate and not os.path.exists(gate):
        time.sleep(0.05)
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(spec["port"]))
    procs.append(subprocess.Popen(spec["cmd"], env=env))
sys.exit(max(abs(p.wait()) for p in procs))
"""


@pytest.mark.slow
def test_a_second_job_on_a_port_in_use_is_refused_and_the_first_trains_on(tmp_path, cache):
    """Two jobs started together on one port: the second's rank 0 cannot listen, and its
    rank 1 reaches the first job's store while the first job's rank 1 is still starting.
    Unchecked, it took that rank's place in the first job's rendezvous: the first job hung
    until run.collective_timeout_s and died. Here the order is made exact by gates."""
    launcher = tmp_path / "deepspeed"
    launcher.write_text(_GATED_LAUNCHER)
    port, gate = free_port(), tmp_path / "first-rank1.go"

    def start(name: str, ranks: list) -> Job:
        cmd = [sys.executable, str(REPO / "train.py"), *set_args(tmp_path / name, cache, "train.max_steps=6")]
        return Job.start([sys.executable, launcher, json.dumps(dict(port=port, ranks=ranks, cmd=cmd))],
                         tmp_path / f"{name}.log")

    first = start("first", [(0, None), (1, str(gate))])
    second = None
    try:
        wait_until(lambda: _listening(port), 120, "the first job's store")
        second = start("second", [(0, None), (1, None)])
        assert second.wait(120) != 0, second.tail()
        errors = error_lines(second.output())
        assert len(errors) == 2, second.tail()
        assert all(f"port {port} on 127.0.0.1 is in use by another job" in e and "--master_port" in e
                   for e in errors), errors
        gate.touch()
        assert first.wait(240) == 0, first.tail()
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert [r["step"] for r in records(tmp_path / "first")] == list(range(1, 7))
    assert not error_lines(first.output()), first.tail()


@pytest.mark.slow
def test_ranks_whose_launcher_is_killed_checkpoint_and_stop(tmp_path, cache):
    """``kill -9`` of the deepspeed runner alone: its node launcher and ranks used to train
    on, re-parented and unseen, to the end."""
    run = tmp_path / "run"
    job = Job.train("deepspeed", 2, run, cache, "train.max_steps=2000", "run.checkpoint_every=0")
    try:
        wait_for_steps(run, 3)
        below = [p for p in psutil.Process(job.pid).children(recursive=True)]
        os.kill(job.pid, signal.SIGKILL)
        job.proc.wait()  # reaped, as a shell would
        killed = time.monotonic()
        wait_until(lambda: not [p for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                   60, "the node launcher and the ranks to exit")
        assert time.monotonic() - killed < 60
    finally:
        job.kill()
    out = job.output()
    assert "the launcher deepspeed (pid" in out and "is gone" in out, out[-3000:]
    stopped = int(re.search(r"stop requested: checkpoint at step (\d+), then exit", out)[1])
    assert (run / "checkpoints" / f"step{stopped:08d}" / "COMPLETE").is_file()
    assert max(r["step"] for r in records(run)) == stopped
    assert not error_lines(out), out[-3000:]
