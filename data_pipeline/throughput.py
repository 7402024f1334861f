"""Throughput of the DALI feed against what a user would write without it, same files, same run.

The baseline is torchvision's ImageFolder recipe: a Dataset over the same file list
decoding with Pillow, ``Resize(256)``, ``RandomCrop(224)``, ``RandomHorizontalFlip``,
``ToTensor``, the PCA noise as a ``Lambda`` and ``Normalize``, behind a DataLoader
with one worker per core. Both produce normalised float32 NCHW batches on the CPU
(or the device, for the feed).

A third way, for GPUs without DALI: torchvision's own batched ``decode_jpeg`` on the
device (nvJPEG on a GPU) with the same augmentations done there on tensors
(:func:`measure_torchvision_decode_jpeg`; on a CPU the same code decodes with libjpeg).

``python -m alexnet_dist.bench data --baseline`` runs them on photographs made by
:func:`make_benchmark_photos`, alternating them for a few rounds.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import psutil
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode

from data_pipeline.feeds import IMAGENET_MEAN, IMAGENET_STD, TrainFeed
from data_pipeline.folder import ImageList
from data_pipeline.eigen import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from data_pipeline.photos import photo_crop
from data_pipeline.sampler import PCA_ALPHA_STD

__all__ = ["make_benchmark_photos", "measure_pipeline", "measure_torchvision_baseline", "measure_torchvision_decode_jpeg"]


def make_benchmark_photos(dir: str, n: int, size: tuple[int, int] = (500, 375), quality: int = 90,
                          classes: int = 4, seed: int = 0) -> str:
    """Write ``n`` JPEGs cut from real photographs into ``dir/<class>/`` (ImageFolder layout); returns ``dir``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(dir, f"class{c}"), exist_ok=True)
    for i in range(n):
        photo_crop(rng, size).save(os.path.join(dir, f"class{i % classes}", f"photo{i:06d}.jpg"), quality=quality)
    return dir


def measure_pipeline(images: ImageList, *, batch_size: int, steps: int, warmup: int, augment: bool = True,
                     num_threads: int = 2, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     prefetch: int = 2, roi_decode: bool = True, image_size: int = 224, resize: int = 256) -> dict:
    """Images/s of :class:`TrainFeed` (one process, both towers) over ``images``."""
    device = torch.device(device)
    feed = TrainFeed(images, micro_batch_size=batch_size, seed=0, augment=augment, replica=0, num_replicas=1,
                     pair_rank=0, pair_size=1, pair_group=None, device=device, dtype=dtype, image_size=image_size,
                     resize=resize, num_threads=num_threads, prefetch=prefetch, roi_decode=roi_decode)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with feed:
        batches = (x for epoch in itertools.count() for x, _ in feed.epoch(epoch))
        result = _time_batches(batches, batch_size, steps, warmup, sync, _process_cpu_seconds)
    return {"what": "dali", "num_threads": num_threads, "prefetch": prefetch, "roi_decode": roi_decode, **result}


def measure_torchvision_baseline(images: ImageList, *, batch_size: int, steps: int, warmup: int,
                                 workers: int | None = None, image_size: int = 224, resize: int = 256) -> dict:
    """Images/s of torchvision's ImageFolder recipe + DataLoader over the same files."""
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
    result = _time_batches(batches, batch_size, steps, warmup, lambda: None, _tree_cpu_seconds)
    del batches, loader  # stops the workers
    return {"what": "torchvision", "workers": workers, **result}


def measure_torchvision_decode_jpeg(images: ImageList, *, batch_size: int, steps: int, warmup: int,
                                    device: str | torch.device = "cpu", image_size: int = 224,
                                    resize: int = 256) -> dict:
    """Images/s of ``torchvision.io.decode_jpeg`` on ``device`` (the batched nvJPEG call on
    a GPU) followed by the same augmentations on the device's tensors."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = _decode_jpeg_batches(images, batch_size, device, image_size, resize)
    result = _time_batches(batches, batch_size, steps, warmup, sync, _process_cpu_seconds)
    return {"what": "torchvision_decode_jpeg", "device": str(device), **result}


def _decode_jpeg_batches(images: ImageList, batch_size: int, device: torch.device, image_size: int,
                         resize: int) -> Iterator[torch.Tensor]:
    """Endless normalised float32 batches: read the files, decode on ``device``, resize the
    short side, random crop, flip, PCA noise, normalise; shuffled each pass."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    eigval, eigvec = torch.from_numpy(IMAGENET_EIGVAL).float(), torch.from_numpy(IMAGENET_EIGVEC).float()
    mean = torch.from_numpy(IMAGENET_MEAN).float().view(1, 3, 1, 1).to(device)
    std = torch.from_numpy(IMAGENET_STD).float().view(1, 3, 1, 1).to(device)
    while True:
        order = torch.randperm(len(images.files), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            data = [read_file(images.files[i]) for i in order[start:start + batch_size]]
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
    """ImageFolder's loading over an :class:`ImageList`: Pillow, RGB, then ``transform``."""

    def __init__(self, images: ImageList, transform: Callable) -> None:
        self.files, self.labels, self.transform = images.files, images.labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), int(self.labels[i])


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


def _time_batches(batches: Iterable, batch_size: int, steps: int, warmup: int, sync: Callable[[], None],
                  cpu_seconds: Callable[[], float]) -> dict:
    """Wall time per batch after ``warmup`` batches: images/s, median and p95 batch time, CPU use."""
    it: Iterator = iter(batches)
    for _ in range(warmup):
        next(it)
    sync()
    times = []
    cpu0, start = cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        next(it)
        sync()
        times.append(time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return {
        "images_per_sec": steps * batch_size / wall,
        "median_batch_s": statistics.median(times),
        "p95_batch_s": float(np.percentile(times, 95)),
        "cpu_time_share": cpu / (wall * os.cpu_count()),
        "cpu_ms_per_image": 1e3 * cpu / (steps * batch_size),  # cost, whatever else loads the machine
        "batch_size": batch_size,
        "steps": steps,
    }
