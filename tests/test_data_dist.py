"""The feeds on real gloo ranks: a pair's batches identical (and equal to one process's), shards disjoint."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from alexnet_dist.groups import TowerGroups
from data_pipeline import list_images
from tests.data_fixtures import make_photo_folder, numbered, train_feed, val_feed
from tests.multiproc import run_ranks


def _feeds(root: str, micro: int, val_batch: int, views: int):
    """This rank's train and val feeds over the numbered files of ``root`` (label = sample index)."""
    groups = TowerGroups.from_world()
    layout = dict(replica=groups.replica, num_replicas=groups.topology.data_parallel_size,
                  pair_rank=groups.pair_rank, pair_size=groups.topology.tower_parallel_size,
                  gather=groups.gather_batch)
    ids = numbered(list_images(root).files)
    return train_feed(ids, micro_batch_size=micro, **layout), val_feed(ids, batch_size=val_batch, views=views, **layout)


def _record(rank: int, world_size: int, root: str, out: str, micro: int, val_batch: int, views: int) -> None:
    train, val = _feeds(root, micro, val_batch, views)
    record = {
        "train": [(x, y) for epoch in (0, 1) for x, y in train.epoch(epoch)],
        "val": list(val.batches()),
        "val_count": val.num_images,
    }
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()


def _load(out: str, world_size: int) -> list[dict]:
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world_size)]


def test_pair_batches_are_bit_identical_and_equal_one_process(tmp_path):
    root = make_photo_folder(str(tmp_path / "data"), {"a": 9, "b": 8})
    run_ranks(2, _record, root, str(tmp_path), 6, 5, 10)
    rank0, rank1 = _load(str(tmp_path), 2)
    ids = numbered(list_images(root).files)
    single = [(x, y) for epoch in (0, 1) for x, y in train_feed(ids, micro_batch_size=6).epoch(epoch)]
    assert len(rank0["train"]) == 2 * (17 // 6)
    for (x0, y0), (x1, y1), (xs, ys) in zip(rank0["train"], rank1["train"], single):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert torch.equal(x0, xs) and torch.equal(y0, ys)  # the layout does not change a pixel
    single_val = list(val_feed(ids, batch_size=5, views=10).batches())
    for (x0, y0), (x1, y1), (xs, ys) in zip(rank0["val"], rank1["val"], single_val, strict=True):
        assert torch.equal(x0, x1) and torch.equal(x0, xs) and torch.equal(y0, ys) and torch.equal(y1, ys)
    assert rank0["val_count"] == 17


def test_four_ranks_shard_disjoint_covering_and_count_validation_once(tmp_path):
    root = make_photo_folder(str(tmp_path / "data"), {"a": 11, "b": 10})
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
