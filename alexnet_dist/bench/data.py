"""``bench data``: the DALI feed alone (decode, crop, flip, colour noise, normalise), and
with ``--baseline`` torchvision's ImageFolder + DataLoader (one worker per core) doing
the same augmentations on the same photographs, and torchvision's batched
``decode_jpeg`` on the bench device (nvJPEG on a GPU), alternated over rounds so that
other load on the machine hits all alike.

Where DALI does not import (a GPU machine without its wheel), ``--baseline`` still
measures the other two and says so (``images_per_sec`` 0, ``dali_missing`` the reason);
without ``--baseline`` that is an error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alexnet_dist.bench.timing import bench_device, median_round, round_ratios
from alexnet_dist.config import Config
from alexnet_dist.metrics import say
from data_pipeline import DataError

__all__ = ["bench_data"]

PHOTOS = 512


def _photos(cfg: Config) -> str:
    """``data.train_dir``, or real-photograph JPEGs at ImageNet size made once in the cache."""
    from data_pipeline.throughput import make_benchmark_photos

    if cfg.data.train_dir:
        return cfg.data.train_dir
    folder = Path(cfg.data.cache_dir).expanduser() / "bench-photos"
    if not folder.is_dir():
        tmp = folder.with_name(f"bench-photos.tmp{os.getpid()}")
        make_benchmark_photos(str(tmp), PHOTOS)
        os.replace(tmp, folder)
    return str(folder)


def bench_data(cfg: Config, baseline: bool, steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    from data_pipeline import list_images
    from data_pipeline.feeds import dali_missing
    from data_pipeline.throughput import measure_pipeline, measure_torchvision_baseline, measure_torchvision_decode_jpeg

    missing = dali_missing()
    if missing and not baseline:
        raise DataError(missing)
    images = list_images(_photos(cfg))
    device = bench_device()
    common = dict(batch_size=cfg.train.micro_batch_size, steps=steps, warmup=warmup,
                  image_size=cfg.data.image_size, resize=cfg.data.resize)
    runs: dict[str, list[dict]] = {"dali": [], "torchvision_dataloader": [], "torchvision_decode_jpeg": []}
    for _ in range(rounds):
        if not missing:
            runs["dali"].append(measure_pipeline(images, augment=cfg.data.augment, num_threads=cfg.data.num_threads,
                                                   prefetch=cfg.data.prefetch, device=device, **common))
        if baseline:
            runs["torchvision_dataloader"].append(measure_torchvision_baseline(images, **common))
            runs["torchvision_decode_jpeg"].append(measure_torchvision_decode_jpeg(images, device=device, **common))
    variants = {name: median_round(r) for name, r in runs.items() if r}
    result: dict[str, Any] = dict(what="data", world_size=1, variants=variants)
    if missing:  # the contract's images_per_sec is the DALI feed's: none delivered here
        say(f"warning: {missing}; measured the baselines only")
        result.update(images_per_sec=0.0, images_per_sec_per_rank=0.0, dali_missing=missing)
    else:
        result.update(images_per_sec=variants["dali"]["images_per_sec"],
                      images_per_sec_per_rank=variants["dali"]["images_per_sec"],
                      cpu_ms_per_image=variants["dali"]["cpu_ms_per_image"])
    if baseline:
        result["baseline_images_per_sec"] = variants["torchvision_dataloader"]["images_per_sec"]
    if baseline and not missing:
        result["ratios_per_round"] = round_ratios(runs["dali"], runs["torchvision_dataloader"])
    return result
