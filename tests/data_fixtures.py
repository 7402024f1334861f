"""Small image folders and feeds for the data pipeline tests (64-96 px photos, 56 px crops)."""

from __future__ import annotations

import dataclasses
import io
import os
import sys

import numpy as np
import torch
from PIL import Image

from data_pipeline import ImageList, PackedImages, TrainFeed, ValFeed, open_images
from data_pipeline.pack import pack
from data_pipeline.packed import ImageSet
from data_pipeline.photos import photo_crop

SMALL = {"image_size": 56, "resize": 64, "num_threads": 1}  # a test's share of 2 cores


def make_photo_folder(root: str, per_class: dict[str, int], size: tuple[int, int] = (96, 72), seed: int = 0) -> str:
    """ImageFolder of photo crops: ``per_class`` maps class name to image count."""
    rng = np.random.default_rng(seed)
    for name, count in per_class.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            photo_crop(rng, size).save(os.path.join(root, name, f"{i:03d}.jpg"), quality=90)
    return root


def solid_jpeg(path: str, size: tuple[int, int], colour: tuple[int, int, int] = (200, 120, 40)) -> str:
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def write_broken_files(folder: str, good: str) -> dict[str, str]:
    """Every kind of broken file in ``folder`` (copied from the JPEG ``good``); name -> the reason the scan gives."""
    data = open(good, "rb").read()
    broken = {
        "truncated.jpg": (data[: len(data) // 2], "truncated"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"just some words\n", "not an image"),
        "random.jpg": (np.random.default_rng(1).bytes(4096), "not an image"),
        "animated.jpg": (_gif_bytes(), "GIF format, which DALI does not decode"),
    }
    for name, (content, _) in broken.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return {name: reason for name, (_, reason) in broken.items()}


def _gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="GIF")
    return buffer.getvalue()


def write_odd_images(folder: str) -> list[str]:
    """Decodable oddities that must train: CMYK, greyscale, progressive, 1x1, 37x3000 both ways, a PNG named .jpg."""
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 255, (72, 96, 3), dtype=np.uint8))
    saves = {
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, quality=90),
        "grey.jpg": lambda p: rgb.convert("L").save(p, quality=90),
        "progressive.jpg": lambda p: rgb.save(p, quality=90, progressive=True),
        "one_pixel.jpg": lambda p: rgb.resize((1, 1)).save(p),
        "thin_37x3000.jpg": lambda p: rgb.resize((37, 3000)).save(p),
        "wide_3000x37.jpg": lambda p: rgb.resize((3000, 37)).save(p),
        "png_inside.jpg": lambda p: rgb.save(p, format="PNG"),
    }
    paths = []
    for name, save in saves.items():
        save(os.path.join(folder, name))
        paths.append(os.path.join(folder, name))
    return paths


def numbered(images: ImageSet | list[str]) -> ImageSet:
    """The images (a set, or files) with the sample index as label: batches then say which samples they hold."""
    if isinstance(images, list):
        images = ImageList(list(images), np.zeros(len(images)), [], [], "")
    n = len(images)
    return dataclasses.replace(images, labels=np.arange(n), classes=[str(i) for i in range(n)])


def record_opens(root: str) -> list[str]:
    """A list that from now on gets every file under ``root`` this process opens, as opened.

    Python's audit hook sees every ``open`` and ``os.open`` (numpy's ``fromfile`` too);
    it cannot be removed: call this only in a process of the test's own (a spawned rank).
    """
    opened: list[str] = []
    prefix = os.path.join(os.path.abspath(root), "")

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(prefix):
            opened.append(args[0])

    sys.addaudithook(hook)
    return opened


def packed(root: str, dst: str, **options) -> PackedImages:
    """``root`` packed into ``dst`` (one worker, no bar), read back."""
    pack(root, dst, workers=1, progress=False, **options)
    return open_images(dst)


def train_feed(images: ImageSet, **overrides) -> TrainFeed:
    """A one-process feed (both towers local) with small test sizes."""
    args = dict(micro_batch_size=8, seed=0, augment=True, replica=0, num_replicas=1, pair_rank=0, pair_size=1,
                device=torch.device("cpu"), dtype=torch.float32, **SMALL)
    return TrainFeed(images, **{**args, **overrides})


def val_feed(images: ImageSet, **overrides) -> ValFeed:
    args = dict(batch_size=8, replica=0, num_replicas=1, pair_rank=0, pair_size=1, device=torch.device("cpu"),
                dtype=torch.float32, **SMALL)
    return ValFeed(images, **{**args, **overrides})


def run_graph(images: list[str], crop_x, crop_y, flip, *, roi_decode: bool = True, image_size: int = 56,
              resize: int = 64) -> torch.Tensor:
    """The training DALI graph alone, on explicit crop and flip parameters: uint8 N x 3 x S x S."""
    from data_pipeline.feeds import load_dali

    n = len(images)
    batch = ([np.fromfile(f, np.uint8) for f in images], np.asarray(crop_x, np.float32).reshape(n),
             np.asarray(crop_y, np.float32).reshape(n), np.asarray(flip, np.int32).reshape(n))
    pipe = load_dali().train_pipeline(iter([batch]), gpu=False, image_size=image_size, resize=resize,
                                      roi_decode=roi_decode, batch_size=n, num_threads=1, device_id=None)
    (out,) = pipe.run()
    return torch.from_numpy(np.array(out.as_tensor()))
