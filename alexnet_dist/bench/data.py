"""``bench data``: the DALI feed alone (decode, crop, flip, colour noise, normalise), and
with ``--baseline`` what a user would write without it, on the same photographs:

* ``dali``: :class:`data_pipeline.TrainFeed` in one process (both towers' batch);
* ``torchvision_dataloader``: torchvision's ImageFolder recipe -- Pillow, ``Resize``,
  ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor``, the PCA noise as a ``Lambda``,
  ``Normalize`` -- behind a DataLoader with one worker per core (the contract's baseline);
* ``torchvision_decode_jpeg``: torchvision's batched ``decode_jpeg`` on the bench device
  (nvJPEG on a GPU, libjpeg on a CPU) and the same augmentations on its tensors.

All three yield normalised float32 NCHW batches and are alternated over rounds, so other
load on the machine hits all alike; all read the samples through the data set's own
``read`` (a file per image from a folder, an offset in a shard from a packed set). Where
DALI does not import (a GPU machine without its wheel), ``--baseline`` still measures
the other two and says so (``images_per_sec`` 0, ``dali_missing`` the reason); without
``--baseline`` that is an error.

With ``--epoch``, what a data set costs the file system: the start-up of rank 0 as the
trainer does it (a folder listed and scanned, a packed set's index read), twice, the
second with warm caches, with the bytes of the set it hands the other ranks; and one
whole epoch of the DALI feed in a fresh process (both towers), counting the data set's
files it opens and the bytes it reads.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode

from alexnet_dist.bench.timing import (bench_device, median_round, on_ranks, round_ratios, summarise, time_steps,
                                       write_rank_result)
from alexnet_dist.build import prepare_images
from alexnet_dist.config import Config
from alexnet_dist.metrics import say
from data_pipeline import DataError, TrainFeed, open_images
from data_pipeline.eigen import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from data_pipeline.feeds import IMAGENET_MEAN, IMAGENET_STD, dali_missing
from data_pipeline.packed import ImageSet
from data_pipeline.photos import make_benchmark_photos
from data_pipeline.sampler import PCA_ALPHA_STD

__all__ = ["bench_data", "measure_epoch_traffic", "measure_pipeline", "measure_startup", "measure_torchvision_baseline",
           "measure_torchvision_decode_jpeg"]

PHOTOS = 512


def _photos(cfg: Config) -> str:
    """``data.train_dir`` (a folder or a pack), or real-photograph JPEGs at ImageNet size made once in the cache."""
    if cfg.data.train_dir:
        return cfg.data.train_dir
    folder = Path(cfg.data.cache_dir).expanduser() / "bench-photos"
    if not folder.is_dir():
        tmp = folder.with_name(f"bench-photos.tmp{os.getpid()}")
        make_benchmark_photos(str(tmp), PHOTOS)
        os.replace(tmp, folder)
    return str(folder)


def bench_data(cfg: Config, baseline: bool, steps: int, warmup: int, rounds: int,
               epoch: bool = False) -> dict[str, Any]:
    missing = dali_missing()
    if missing and not baseline:
        raise DataError(missing)
    root = _photos(cfg)
    images = open_images(root)
    device = bench_device()
    common = dict(batch_size=cfg.train.micro_batch_size, steps=steps, warmup=warmup,
                  image_size=cfg.data.image_size, resize=cfg.data.resize)
    runs: dict[str, list[dict]] = {"dali": [], "torchvision_dataloader": [], "torchvision_decode_jpeg": []}
    for _ in range(rounds):
        if not missing:
            runs["dali"].append(measure_pipeline(images, augment=cfg.data.augment, num_threads=cfg.data.num_threads,
                                                   prefetch=cfg.data.prefetch, decode_ahead=cfg.data.decode_ahead,
                                                   device=device, **common))
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
    if epoch:
        result.update(measure_startup(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_dir=root,
                                                                                        val_dir=None))))
        result["epoch"] = measure_epoch_traffic(
            images, batch_size=cfg.train.micro_batch_size, augment=cfg.data.augment, num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch, image_size=cfg.data.image_size, resize=cfg.data.resize)
    return result


def measure_startup(cfg: Config) -> dict:
    """Rank 0's start-up over ``data.train_dir`` as the trainer does it (:func:`prepare_images`),
    twice (the second with warm caches), and the bytes of the set it hands the other ranks."""
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        images, _ = prepare_images(cfg)
        seconds.append(time.perf_counter() - start)
    return dict(startup_first_s=seconds[0], startup_s=seconds[1], startup_images=len(images),
                handover_bytes_per_image=len(pickle.dumps(images)) / len(images))


def measure_epoch_traffic(images: ImageSet, *, batch_size: int, augment: bool = True, num_threads: int = 2,
                          prefetch: int = 2, image_size: int = 224, resize: int = 256) -> dict:
    """One whole epoch of :class:`TrainFeed` (one process, both towers) in a fresh process:
    the data set's files it opens (every open, and distinct files), the bytes it reads
    (``rchar`` of ``/proc/self/io``: every read and pread), images and seconds."""
    settings = dict(micro_batch_size=batch_size, seed=0, augment=augment, replica=0, num_replicas=1, pair_rank=0,
                    pair_size=1, device=torch.device("cpu"), dtype=torch.float32, image_size=image_size,
                    resize=resize, num_threads=num_threads, prefetch=prefetch)
    result, _ = on_ranks(1, _epoch_traffic, images, settings)
    return {k: result[k] for k in ("files_opened", "distinct_files_opened", "bytes_read", "images", "seconds")}


def _epoch_traffic(rank: int, world_size: int, images: ImageSet, settings: dict, out: Path) -> None:
    """:func:`measure_epoch_traffic`'s worker: a process of its own, since an audit hook stays for good."""
    with TrainFeed(copy.deepcopy(images), **settings) as warm:  # a copy, with its own shard files: DALI's first
        next(iter(warm.epoch(0)))                               # pipeline reads its modules' sources, not counted
    feed = TrainFeed(images, **settings)
    opened: list[str] = []
    under = os.path.join(images.root, "")
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and isinstance(args[0], str)
                     and args[0].startswith(under) else None)  # every open() and os.open(), numpy's too
    start, read_before = time.perf_counter(), _bytes_read()
    batches = sum(1 for _ in feed.epoch(0))
    write_rank_result(rank, out, dict(files_opened=len(opened), distinct_files_opened=len(set(opened)),
                                      bytes_read=_bytes_read() - read_before, images=batches * feed.micro_batch_size,
                                      seconds=time.perf_counter() - start))


def _bytes_read() -> int:
    """Bytes this process has read through read and pread calls (Linux's ``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


# ---------------------------------------------------------------- the variants


def measure_pipeline(images: ImageSet, *, batch_size: int, steps: int, warmup: int, augment: bool = True,
                     num_threads: int = 2, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     prefetch: int = 2, roi_decode: bool = True, image_size: int = 224, resize: int = 256,
                     decode_ahead: int = 0) -> dict:
    """Images/s of :class:`TrainFeed` (one process, both towers) over ``images``."""
    device = torch.device(device)
    feed = TrainFeed(images, micro_batch_size=batch_size, seed=0, augment=augment, replica=0, num_replicas=1,
                     pair_rank=0, pair_size=1, device=device, dtype=dtype, image_size=image_size, resize=resize,
                     num_threads=num_threads, prefetch=prefetch, roi_decode=roi_decode, decode_ahead=decode_ahead)
    with feed:
        batches = (x for epoch in itertools.count() for x, _ in feed.epoch(epoch))
        result = _time_batches(batches, batch_size, steps, warmup, device, _process_cpu_seconds)
    return {"what": "dali", "num_threads": num_threads, "prefetch": prefetch, "roi_decode": roi_decode,
            "decode_ahead": decode_ahead, **result}


def measure_torchvision_baseline(images: ImageSet, *, batch_size: int, steps: int, warmup: int,
                                 workers: int | None = None, image_size: int = 224, resize: int = 256) -> dict:
    """Images/s of torchvision's ImageFolder recipe + DataLoader over the same images."""
    workers = workers if workers is not None else os.cpu_count()
    dataset = _FileDataset(images, transforms.Compose([
        transforms.Resize(resize),
        transforms.RandomCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Lambda(_pca_noise),
        transforms.Normalize((IMAGENET_MEAN / 255).tolist(), (IMAGENET_STD / 255).tolist()),
    ]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    batches = (x for _ in itertools.count() for x, _ in loader)
    result = _time_batches(batches, batch_size, steps, warmup, torch.device("cpu"), _tree_cpu_seconds)
    del batches, loader  # stops the workers
    return {"what": "torchvision", "workers": workers, **result}


def measure_torchvision_decode_jpeg(images: ImageSet, *, batch_size: int, steps: int, warmup: int,
                                    device: str | torch.device = "cpu", image_size: int = 224,
                                    resize: int = 256) -> dict:
    """Images/s of ``torchvision.io.decode_jpeg`` on ``device`` (the batched nvJPEG call on
    a GPU) followed by the same augmentations on the device's tensors."""
    device = torch.device(device)
    batches = _decode_jpeg_batches(images, batch_size, device, image_size, resize)
    result = _time_batches(batches, batch_size, steps, warmup, device, _process_cpu_seconds)
    return {"what": "torchvision_decode_jpeg", "device": str(device), **result}


def _decode_jpeg_batches(images: ImageSet, batch_size: int, device: torch.device, image_size: int,
                         resize: int) -> Iterator[torch.Tensor]:
    """Endless normalised float32 batches: read the files, decode on ``device``, resize the
    short side, random crop, flip, PCA noise, normalise; shuffled each pass."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    eigval, eigvec = torch.from_numpy(IMAGENET_EIGVAL).float(), torch.from_numpy(IMAGENET_EIGVEC).float()
    mean = torch.from_numpy(IMAGENET_MEAN).float().view(1, 3, 1, 1).to(device)
    std = torch.from_numpy(IMAGENET_STD).float().view(1, 3, 1, 1).to(device)
    while True:
        order = torch.randperm(len(images), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            data = [torch.from_numpy(images.read(i)) for i in order[start:start + batch_size]]
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)  # n x (3 x H x W) uint8
            crops = []
            for img in decoded:
                img = TF.resize(img, [resize], antialias=True)
                top, left = (int(torch.randint(0, s - image_size + 1, (), generator=g)) for s in img.shape[-2:])
                img = img[:, top:top + image_size, left:left + image_size]
                crops.append(img.flip(-1) if torch.rand((), generator=g) < 0.5 else img)
            alpha = torch.randn(batch_size, 3, generator=g) * PCA_ALPHA_STD
            shift = 255 * (alpha * eigval) @ eigvec.T  # n x 3, the paper's colour noise on the 0..255 scale
            yield (torch.stack(crops).float() + shift.view(-1, 3, 1, 1).to(device) - mean) / std


class _FileDataset(torch.utils.data.Dataset):
    """ImageFolder's loading over an image set: the sample's bytes, Pillow, RGB, then ``transform``."""

    def __init__(self, images: ImageSet, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.images.read(i))) as im:
            return self.transform(im.convert("RGB")), int(self.images.labels[i])


def _pca_noise(x: torch.Tensor) -> torch.Tensor:
    """The paper's colour noise on a 0..1 CHW tensor, ImageNet eigen."""
    alpha = torch.randn(3, dtype=torch.float64) * PCA_ALPHA_STD
    shift = torch.from_numpy(IMAGENET_EIGVEC) @ (alpha * torch.from_numpy(IMAGENET_EIGVAL))
    return x + shift.to(x.dtype).view(3, 1, 1)


def _process_cpu_seconds() -> float:
    return time.process_time()  # every thread of this process, DALI's included


def _tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the DataLoader workers)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _time_batches(batches: Iterable, batch_size: int, steps: int, warmup: int, device: torch.device,
                  cpu_seconds: Callable[[], float]) -> dict:
    """The bench's step timing (:func:`time_steps`) with a step being one batch, plus the
    CPU it took: cost per image, whatever else loads the machine."""
    it: Iterator = iter(batches)
    cpu_start: list[float] = []
    times = time_steps(lambda: next(it), steps, warmup, device, after_warmup=lambda: cpu_start.append(cpu_seconds()))
    cpu = cpu_seconds() - cpu_start[0]
    return dict(summarise(times, batch_size), cpu_time_share=cpu / (sum(times) * os.cpu_count()),
                cpu_ms_per_image=1e3 * cpu / (steps * batch_size), batch_size=batch_size, steps=steps)
