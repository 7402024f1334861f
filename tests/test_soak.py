"""Soak: 500 steps of the small model on 2 ranks (DeepSpeed's launcher), many epochs of
a tiny data set, so that every per-step and per-epoch path (DALI passes, pair gathers,
optimizer, metrics) repeats hundreds of times. While it runs, the test samples each rank
process (found as the launcher's children) at every log boundary: /proc/<pid>/status
VmRSS and the entries of /proc/<pid>/fd. After warm-up neither may grow: resident memory
under 5 %, open files not at all beyond a couple of transient ones.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.data_fixtures import make_photo_folder
from tests.reliability import EXACT, Job, dataset_cache, metric_steps, rank_processes, wait_until

pytestmark = [pytest.mark.slow]

STEPS = 500
LOG_EVERY = 20  # metrics (and so samples) every 20 steps; nothing else is logged
WARM_UP = 100  # steps before the baseline sample
MAX_RSS_GROWTH = 0.05
MAX_EXTRA_FDS = 2


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.mark.timeout(600)
def test_500_steps_on_two_ranks_keep_memory_and_open_files_flat(tmp_path_factory, tmp_path):
    data = make_photo_folder(str(tmp_path / "data"), {"a": 16, "b": 16}, size=(80, 80))  # 4 steps an epoch
    run = tmp_path / "run"
    job = Job.train(
        "deepspeed", 2, run, dataset_cache(tmp_path_factory), *EXACT,
        f"data.train_dir={data}", f"train.max_steps={STEPS}", "train.epochs=100000", f"run.log_every={LOG_EVERY}",
        "run.checkpoint_every=0", "train.eval_every_epochs=100000",
    )
    samples: dict[int, list[tuple[int, int, int]]] = {}  # rank -> [(step, rss KiB, fds)]
    seen = 0
    try:
        ranks = wait_until(lambda: (r := rank_processes(launcher_pid=job.pid)) and len(r) == 2 and r,
                           120, "2 rank processes")
        pids = {rank: p.pid for rank, p in ranks.items()}

        def new_boundary_or_end():
            steps = metric_steps(run)  # a boundary's lines are all there once the last is
            last = steps[-1] if steps else 0
            return (last > seen and last % LOG_EVERY == 0 and last) or job.proc.poll() is not None

        while True:
            got = wait_until(new_boundary_or_end, 300, f"a log boundary after step {seen}", interval=0.02)
            if job.proc.poll() is not None:
                break
            seen = got
            if seen >= STEPS:
                break
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for rank, pid in pids.items():
                    samples.setdefault(rank, []).append((seen, _rss_kib(pid), _fds(pid)))
        rc = job.wait(120)
    finally:
        job.kill()
    assert rc == 0, job.tail()
    assert max(metric_steps(run)) == STEPS
    for rank, rows in samples.items():
        after = [r for r in rows if r[0] >= WARM_UP]
        assert len(after) >= (STEPS - WARM_UP) // LOG_EVERY - 3, (rank, rows)  # the samples cover the run
        base_step, base_rss, base_fds = after[0]
        peak_rss = max(r[1] for r in after)
        assert peak_rss <= base_rss * (1 + MAX_RSS_GROWTH), (
            f"rank {rank}: VmRSS {base_rss} KiB at step {base_step} grew to {peak_rss} KiB: {rows}")
        assert max(r[2] for r in after) <= base_fds + MAX_EXTRA_FDS, f"rank {rank}: open files grew: {rows}"
        # A leak stays: any steady one (even 1 file per 200 steps) lifts the median of the second
        # half. Files a rank holds for a while are not one: CI once saw 34, 35, 35 over 33 in
        # the last three samples of 24 (steps 440-480), with the same code that had passed.
        late = sorted(r[2] for r in after[len(after) // 2:])
        assert late[len(late) // 2] <= base_fds, f"rank {rank}: open files stayed above the baseline: {rows}"
