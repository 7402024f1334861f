"""The embedded default's data set: generated once, cached, learnable in a few epochs.

Five classes, each a large translucent shape in its own colour (red circle, green
cross, blue ring, yellow square, magenta triangle) drawn at a random place and size
over a random crop of a real photograph, saved as 256x256 JPEGs at quality 90 -- the
paper's preparation of ImageNet (shorter side to 256, the central square kept), which
``data_pipeline.downsample`` does for a real data set: 60 training and 20 validation
images per class. Shape and colour both define the class, so a small CNN separates
them within a few epochs, while the photo background keeps decoding and augmentation
realistic. Built under a lock in a temporary folder and renamed into place: concurrent
first starts wait for one build and never see half a data set.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.fsutil import locked
from data_pipeline.photos import photo_crop

__all__ = ["DEMO_CLASSES", "ensure_demo_dataset", "make_demo_split"]

DEMO_CLASSES = {  # name -> RGB colour of its shape
    "circle": (230, 30, 30),
    "cross": (30, 200, 30),
    "ring": (40, 60, 240),
    "square": (240, 220, 20),
    "triangle": (220, 40, 220),
}
_VERSION = "demo-v2"  # bump when the generator changes: old caches are then left alone
_SIZE = (256, 256)
_PER_CLASS = {"train": 60, "val": 20}


def ensure_demo_dataset(cache_dir: str) -> tuple[str, str]:
    """(train_dir, val_dir) of the demo data set under ``cache_dir``, generating it the first time."""
    cache_dir = os.path.expanduser(cache_dir)
    final = os.path.join(cache_dir, _VERSION)
    if not os.path.isdir(final):
        os.makedirs(cache_dir, exist_ok=True)
        with locked(os.path.join(cache_dir, f".{_VERSION}.lock")):  # the others wait, then find it made
            if not os.path.isdir(final):
                _build(final)
    return os.path.join(final, "train"), os.path.join(final, "val")


def _build(final: str) -> None:
    """Generate the data set beside ``final`` and rename it into place."""
    tmp = tempfile.mkdtemp(prefix=f".{_VERSION}-", dir=os.path.dirname(final))
    try:
        for seed, (split, per_class) in enumerate(_PER_CLASS.items()):
            make_demo_split(os.path.join(tmp, split), per_class, seed)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename; a leftover after a failure


def make_demo_split(root: str, per_class: int, seed: int, size: tuple[int, int] = _SIZE) -> None:
    """Write ``per_class`` JPEGs of every demo class under ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for name, colour in DEMO_CLASSES.items():
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            image = photo_crop(rng, size)
            _draw_shape(image, name, colour, rng)
            image.save(os.path.join(root, name, f"{name}_{i:04d}.jpg"), quality=90)


def _draw_shape(image: Image.Image, name: str, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    """Blend the class's shape into ``image`` in place: 35-55% of the short side, fully inside."""
    side = int(min(image.size) * rng.uniform(0.35, 0.55))
    x0 = int(rng.integers(0, image.width - side))
    y0 = int(rng.integers(0, image.height - side))
    box = (x0, y0, x0 + side, y0 + side)
    mask = Image.new("L", image.size)
    draw = ImageDraw.Draw(mask)
    fill, bar = 200, side // 4  # 200/255 opacity: the photo shows through
    if name == "circle":
        draw.ellipse(box, fill=fill)
    elif name == "ring":
        draw.ellipse(box, outline=fill, width=bar)
    elif name == "square":
        draw.rectangle(box, fill=fill)
    elif name == "triangle":
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    else:  # cross
        mid_x, mid_y = x0 + side // 2, y0 + side // 2
        draw.rectangle((mid_x - bar // 2, y0, mid_x + bar // 2, y0 + side), fill=fill)
        draw.rectangle((x0, mid_y - bar // 2, x0 + side, mid_y + bar // 2), fill=fill)
    image.paste(Image.new("RGB", image.size, colour), mask=mask)
