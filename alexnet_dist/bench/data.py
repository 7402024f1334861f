"""``bench data``: the DALI feed alone (decode, crop, flip, colour noise, normalise), and
with ``--baseline`` torchvision's ImageFolder + DataLoader (one worker per core) doing
the same augmentations on the same photographs, alternated over rounds so that other
load on the machine hits both alike."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from alexnet_dist.bench.timing import bench_device
from alexnet_dist.config import Config

__all__ = ["bench_data"]

PHOTOS = 512
ROUNDS = 3


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


def bench_data(cfg: Config, baseline: bool, steps: int, warmup: int) -> dict[str, Any]:
    from data_pipeline import list_images
    from data_pipeline.throughput import measure_pipeline, measure_torchvision_baseline

    images = list_images(_photos(cfg))
    device = bench_device()
    common = dict(batch_size=cfg.train.micro_batch_size, steps=steps, warmup=warmup,
                  image_size=cfg.data.image_size, resize=cfg.data.resize)
    dali, base = [], []
    for _ in range(ROUNDS if baseline else 1):
        dali.append(measure_pipeline(images, augment=cfg.data.augment, num_threads=cfg.data.num_threads,
                                     prefetch=cfg.data.prefetch, device=device, **common))
        if baseline:
            base.append(measure_torchvision_baseline(images, **common))
    median = statistics.median(r["images_per_sec"] for r in dali)
    result = dict(what="data", images_per_sec=median, images_per_sec_per_rank=median, world_size=1,
                  cpu_ms_per_image=statistics.median(r["cpu_ms_per_image"] for r in dali),
                  variants={"dali": dali[len(dali) // 2]})
    if baseline:
        result["baseline_images_per_sec"] = statistics.median(r["images_per_sec"] for r in base)
        result["ratios_per_round"] = [d["images_per_sec"] / b["images_per_sec"] for d, b in zip(dali, base)]
        result["variants"]["torchvision_dataloader"] = base[len(base) // 2]
    return result
