"""The feeds on real gloo ranks, over a folder and over its packed form: a pair's batches
identical (and equal to one process's), shards disjoint, and the files each rank opens."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from alexnet_dist.groups import TowerGroups
from data_pipeline import open_images
from data_pipeline.pack import pack
from data_pipeline.packed import shard_name
from tests.data_fixtures import make_photo_folder, numbered, record_opens, train_feed, val_feed
from tests.multiproc import run_ranks

FORMS = ["folder", "packed"]
SHARDS = 3


def _data(tmp_path, form: str, per_class: dict[str, int]) -> str:
    """A photo folder, or its packed form: the data set the ranks read."""
    root = make_photo_folder(str(tmp_path / "data"), per_class)
    if form == "folder":
        return root
    pack(root, str(tmp_path / "packed"), shards=SHARDS, workers=1, progress=False)
    return str(tmp_path / "packed")


def _feeds(root: str, micro: int, val_batch: int, views: int, decode_ahead: int = 0):
    """This rank's train and val feeds over the numbered samples of ``root`` (label = sample index)."""
    groups = TowerGroups.from_world()
    layout = dict(replica=groups.replica, num_replicas=groups.topology.data_parallel_size,
                  pair_rank=groups.pair_rank, pair_size=groups.topology.tower_parallel_size,
                  gather=groups.gather_batch)
    ids = numbered(open_images(root))
    return (train_feed(ids, micro_batch_size=micro, decode_ahead=decode_ahead, **layout),
            val_feed(ids, batch_size=val_batch, views=views, decode_ahead=decode_ahead, **layout))


def _record(rank: int, world_size: int, root: str, out: str, micro: int, val_batch: int, views: int,
            decode_ahead: int = 0) -> None:
    train, val = _feeds(root, micro, val_batch, views, decode_ahead)
    opened = record_opens(root)
    record = {"train": [(x, y) for epoch in (0, 1) for x, y in train.epoch(epoch)]}
    record["opened_in_training"] = list(opened)
    record.update(val=list(val.batches()), val_count=val.num_images, opened=list(opened))
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()


def _load(out: str, world_size: int) -> list[dict]:
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world_size)]


def _check_opened(form: str, root: str, rank: dict, decoded_in_training: int) -> None:
    """A folder's rank opens each image it decodes, every time; a packed set's opens shards, each once."""
    if form == "folder":
        assert len(rank["opened_in_training"]) == decoded_in_training
        assert all(path.endswith(".jpg") for path in rank["opened"])
    else:
        shards = {os.path.join(root, shard_name(s)) for s in range(SHARDS)}
        assert set(rank["opened"]) <= shards and len(rank["opened"]) == len(set(rank["opened"])) > 0


@pytest.mark.parametrize("form, decode_ahead", [("folder", 0), ("packed", 0), ("folder", 2)])
def test_pair_batches_are_bit_identical_and_equal_one_process(tmp_path, form, decode_ahead):
    """Also with the ranks decoding ahead on worker threads: one process without gives the same batches."""
    root = _data(tmp_path, form, {"a": 9, "b": 8})
    run_ranks(2, _record, root, str(tmp_path), 6, 5, 10, decode_ahead)
    rank0, rank1 = _load(str(tmp_path), 2)
    ids = numbered(open_images(root))
    single = [(x, y) for epoch in (0, 1) for x, y in train_feed(ids, micro_batch_size=6).epoch(epoch)]
    assert len(rank0["train"]) == 2 * (17 // 6)
    for (x0, y0), (x1, y1), (xs, ys) in zip(rank0["train"], rank1["train"], single):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0, xs) and torch.equal(y0, ys)  # the layout does not change a pixel
    single_val = list(val_feed(ids, batch_size=5, views=10).batches())
    for (x0, y0), (x1, y1), (xs, ys) in zip(rank0["val"], rank1["val"], single_val, strict=True):
        assert torch.equal(x0, x1) and torch.equal(x0, xs) and torch.equal(y0, ys) and torch.equal(y1, ys)
    assert rank0["val_count"] == 17
    for rank in (rank0, rank1):
        _check_opened(form, root, rank, decoded_in_training=2 * (17 // 6) * 3)  # half of each batch of 6


@pytest.mark.parametrize("form", FORMS)
def test_four_ranks_shard_disjoint_covering_and_count_validation_once(tmp_path, form):
    root = _data(tmp_path, form, {"a": 11, "b": 10})
    run_ranks(4, _record, root, str(tmp_path), 4, 3, 1)
    ranks = _load(str(tmp_path), 4)
    for pair in ((0, 1), (2, 3)):  # both towers of a replica see the same batches
        for (xa, ya), (xb, yb) in zip(ranks[pair[0]]["train"], ranks[pair[1]]["train"], strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    steps = 21 // 8
    for epoch in (0, 1):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            replica0, replica1 = ranks[0]["train"][step][1].tolist(), ranks[2]["train"][step][1].tolist()
            assert not set(replica0) & set(replica1)
            seen += replica0 + replica1
        assert len(seen) == len(set(seen)) == steps * 8  # an epoch: no sample twice, all but 21 % 8 seen
    val = [torch.cat([y for _, y in ranks[r]["val"]]).tolist() for r in range(4)]
    assert val[0] == val[1] and val[2] == val[3]
    assert sorted(val[0] + val[2]) == list(range(21))  # every image once over the replicas
    assert ranks[0]["val_count"] + ranks[2]["val_count"] == 21
    for rank in ranks:
        _check_opened(form, root, rank, decoded_in_training=2 * steps * 2)  # half of each micro batch of 4
