"""Checkpoints independent of the layout (real processes, CPU): a run interrupted on one
layout resumes on another -- one process, 2 or 4 ranks, ZeRO 0 or 1 -- and, with
``train.global_batch_size`` fixed, continues the uninterrupted run's losses exactly:
weights, momentum, schedule, data position and RNG all carry over.

Every run here is the small exact job (``data.augment=false``, ``model.dropout=0``) with 16
images per optimizer step in 4-image micro batches: 4 micro batches per step on one
replica, 2 on two. The interrupted runs are made by copying an uninterrupted run's
checkpoint of step 3 (and its metrics up to there) into a fresh run.dir.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.launch import EXACT, check, losses, train
from tests.reliability import dataset_cache, error_lines, interrupted_at

STEPS, AT = 6, 3
SETS = [*EXACT, "train.global_batch_size=16", "train.micro_batch_size=4", f"run.checkpoint_every={AT}",
        "run.keep_last=5", f"train.max_steps={STEPS}"]
LAUNCH = {1: "python", 2: "deepspeed", 4: "deepspeed"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return dataset_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Uninterrupted runs by (ranks, ZeRO stage), made once each."""
    made: dict[tuple[int, int], Path] = {}

    def run(ranks: int, zero: int) -> Path:
        if (ranks, zero) not in made:
            path = tmp_path_factory.mktemp(f"uninterrupted-{ranks}-zero{zero}")
            check(train(LAUNCH[ranks], ranks, path, *SETS, f"train.zero_stage={zero}", cache=cache, timeout=400))
            made[ranks, zero] = path
        return made[ranks, zero]

    return run


def _same(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == STEPS, (a, b)
    assert all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a, b)), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("written, resumed, says", [
    ((2, 0), (1, 0), "resuming a checkpoint of 2 ranks on 1 process"),
    ((2, 0), (4, 0), "resuming a checkpoint of 2 ranks on 4 ranks: 2 replicas instead of 1"),
    ((4, 1), (2, 1), "resuming a checkpoint of 4 ranks on 2 ranks: 1 replica instead of 2"),
    ((4, 1), (1, 0), "ZeRO stage 0 instead of 1"),
], ids=["2-to-1", "2-to-4", "4-zero1-to-2-zero1", "4-zero1-to-1"])
def test_a_checkpoint_resumes_on_another_layout_with_the_uninterrupted_losses(written, resumed, says, runs,
                                                                           tmp_path, cache):
    (ranks, zero), (new_ranks, new_zero) = written, resumed
    run = interrupted_at(runs(ranks, zero), tmp_path / "run", AT)
    result = check(train(LAUNCH[new_ranks], new_ranks, run, *SETS, f"train.zero_stage={new_zero}", cache=cache,
                         timeout=400))
    assert f"resumed from step {AT}" in result.stdout and says in result.stdout, result.stdout[-3000:]
    _same(losses(run), losses(runs(2, 0)))


@pytest.mark.slow
def test_without_a_fixed_global_batch_a_new_layout_continues_from_the_same_image_and_says_so(runs, tmp_path, cache):
    """8 images per step on one replica, 16 on two: step 3's 24 images are one and a half of
    the new steps; the half is seen again, and the run ends at the same epoch's end."""
    sets = [s for s in SETS if not s.startswith(("train.global_batch_size", "train.max_steps"))]
    sets += ["train.micro_batch_size=8", "train.epochs=1"]
    first = tmp_path / "first"
    check(train("deepspeed", 2, first, *sets, "train.max_steps=3", cache=cache))
    result = check(train("deepspeed", 4, first, *sets, cache=cache, timeout=400))
    assert ("2 replicas instead of 1; 16 images per step instead of 8 (set train.global_batch_size to keep it), "
            "8 images seen again") in result.stdout, result.stdout[-3000:]
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(line)]
    # 300 images: 37 steps of 8; after 24 images, 16 per step from image 16 on: 17 more steps
    assert steps == list(range(1, 3 + 17 + 1)), steps


def test_a_checkpoint_of_another_network_is_refused_on_every_layout_in_one_line(runs, tmp_path, cache):
    run = interrupted_at(runs(2, 0), tmp_path / "run", AT)
    result = train("deepspeed", 4, run, *SETS, "model.width_mult=0.25", cache=cache, timeout=300)
    errors = error_lines(result.stdout + result.stderr)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "holds another network: it was made with width_mult=0.125, this run has width_mult=0.25" in errors[0]


@pytest.mark.slow
def test_a_resume_at_an_epoch_boundary_continues_the_uninterrupted_losses(tmp_path, cache):
    """300 images make 75 micro batches of 4 an epoch, 18 steps of 4 micro batches: the 3
    left over must not start the next epoch, or a run resumed at step 18 (which starts the
    next epoch afresh) would not follow an uninterrupted one."""
    sets = [s for s in SETS if not s.startswith("train.max_steps")]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    check(train("python", 1, whole, *sets, "train.max_steps=20", cache=cache))
    check(train("python", 1, resumed, *sets, "train.max_steps=18", cache=cache))
    check(train("python", 1, resumed, *sets, "train.max_steps=20", cache=cache))
    assert losses(resumed) == pytest.approx(losses(whole), rel=1e-6)
