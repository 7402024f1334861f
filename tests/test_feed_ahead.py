"""Decoding ahead on a worker thread (``data.decode_ahead``): the same batches, errors raised on
the caller's thread as one line, and nothing left running after ``close``."""

from __future__ import annotations

import dataclasses
import gc
import os
import threading

import pytest
import torch

from data_pipeline import DataError, list_images
from data_pipeline.ahead import Ahead
from tests.data_fixtures import make_photo_folder, train_feed, val_feed


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = make_photo_folder(str(tmp_path_factory.mktemp("photos")), {"a": 13, "b": 12, "c": 11})
    return list_images(root)


def batches(it) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in it]


def assert_same(ours, theirs) -> None:
    for (x, y), (x2, y2) in zip(ours, theirs, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "decode ahead" in t.name]


def dali_threads() -> int:
    """Native threads of this process that DALI pipelines run (named ``[DALI]...``)."""
    tasks = os.listdir("/proc/self/task")
    return sum(_comm(t).startswith("[DALI]") for t in tasks)


def _comm(task: str) -> str:
    try:
        with open(f"/proc/self/task/{task}/comm") as f:
            return f.read()
    except FileNotFoundError:  # a thread that ended while we looked
        return ""


@pytest.mark.parametrize("depth", [1, 3])
def test_decoding_ahead_gives_the_same_batches_and_resumes_at_the_same_step(photos, depth):
    plain, ahead = train_feed(photos), train_feed(photos, decode_ahead=depth)  # augmented: crops, flips, noise
    for epoch in (0, 1):
        assert_same(batches(ahead.epoch(epoch)), batches(plain.epoch(epoch)))
    assert_same(batches(ahead.epoch(1, start_step=2)), batches(plain.epoch(1, start_step=2)))
    views = [val_feed(photos, batch_size=5, views=10, decode_ahead=d).batches() for d in (0, depth)]
    assert_same(batches(views[1]), batches(views[0]))
    assert not workers()


def test_an_undecodable_file_is_raised_on_the_callers_thread_as_the_same_line(photos, tmp_path):
    (tmp_path / "text.jpg").write_bytes(b"just some words\n")
    broken = dataclasses.replace(photos, files=[*photos.files[:-1], str(tmp_path / "text.jpg")])
    seen = {}
    for depth in (0, 2):
        taken = []
        with pytest.raises(DataError) as error:
            for x, _ in train_feed(broken, micro_batch_size=4, augment=False, decode_ahead=depth).epoch(0):
                taken.append(x.clone())
        seen[depth] = (str(error.value), taken)
    (line, before), (line_ahead, before_ahead) = seen[0], seen[2]
    assert line_ahead == line and "\n" not in line and "text.jpg" in line
    assert len(before) < 9 and len(before_ahead) == len(before)  # the batches before the bad one still come
    assert all(torch.equal(a, b) for a, b in zip(before, before_ahead))
    assert not workers()


def test_close_mid_epoch_stops_the_worker_and_its_pipeline_and_a_new_pass_works(photos):
    expected = batches(train_feed(photos).epoch(1))
    gc.collect()  # pipelines that earlier tests' exceptions keep in reference cycles
    feed = train_feed(photos, decode_ahead=2)
    old = feed.epoch(0)
    next(old)
    assert len(workers()) == 1 and dali_threads() > 0
    feed.close()
    assert not workers() and dali_threads() == 0  # the pipeline's threads went with it
    with pytest.raises(StopIteration):
        next(old)
    assert_same(batches(feed.epoch(1)), expected)
    next(feed.epoch(0))
    next(feed.epoch(1))  # starting another pass ends the running one, worker and all
    assert len(workers()) == 1
    feed.close()
    assert not workers() and dali_threads() == 0


def test_an_exception_in_training_stops_the_worker_on_leaving_the_feed(photos):
    with pytest.raises(ZeroDivisionError):
        with train_feed(photos, decode_ahead=2) as feed:
            for _ in feed.epoch(0):
                1 / 0
    assert not workers()


def test_ahead_delivers_in_order_then_the_error_and_closes_a_blocked_worker_on_its_own_thread():
    closed_on = []

    def items(fail_at: int | None):
        try:
            n = 0
            while True:
                if n == fail_at:
                    raise DataError("sample 3 is broken")
                yield n
                n += 1
        finally:
            closed_on.append(threading.current_thread().name)

    with Ahead(items(3), depth=2, name="failing") as ahead:
        assert [next(ahead) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(DataError, match="^sample 3 is broken$"):
            next(ahead)
        with pytest.raises(StopIteration):
            next(ahead)
    endless = Ahead(items(None), depth=2, name="endless")
    assert next(endless) == 0  # the worker then fills its two places and waits for room
    endless.close()
    with pytest.raises(StopIteration):
        next(endless)
    assert closed_on == ["failing", "endless"]
    assert not [t for t in threading.enumerate() if t.name in ("failing", "endless")]
