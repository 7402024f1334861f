"""Real photographs, offline: random crops of the two JPEGs scikit-learn ships.

Synthetic noise decodes at a different speed from photographs, so benchmarks and
the demo data set are cut from ``sklearn.datasets.load_sample_images()`` (two
640x427 photos: a temple in China and a flower).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
from PIL import Image

__all__ = ["make_benchmark_photos", "photo_crop", "sample_photos"]


@functools.cache
def sample_photos() -> tuple[Image.Image, ...]:
    """The two sample photographs as RGB images.

    Read from scikit-learn's package folder without importing it (the import takes
    seconds); these are the files ``load_sample_images`` returns.
    """
    (package,) = importlib.util.find_spec("sklearn").submodule_search_locations
    folder = os.path.join(package, "datasets", "images")
    return tuple(Image.open(os.path.join(folder, name)).convert("RGB") for name in ("china.jpg", "flower.jpg"))


def photo_crop(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random window of a random sample photo with ``size``'s aspect, resized to ``size`` (w, h).

    The window is at least ``size`` where the photo allows, so detail is not invented
    by upscaling; it is mirrored half of the time.
    """
    photo = sample_photos()[rng.integers(len(sample_photos()))]
    width, height = size
    fit = min(photo.width / width, photo.height / height)  # largest window of this aspect
    scale = rng.uniform(min(1.0, fit), fit)
    w, h = round(width * scale), round(height * scale)
    x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
    crop = photo.resize(size, Image.BILINEAR, box=(x, y, x + w, y + h))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def make_benchmark_photos(dir: str, n: int, size: tuple[int, int] = (500, 375), quality: int = 90,
                          classes: int = 4, seed: int = 0) -> str:
    """Write ``n`` JPEGs cut from real photographs into ``dir/<class>/`` (ImageFolder layout); returns ``dir``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(dir, f"class{c}"), exist_ok=True)
    for i in range(n):
        photo_crop(rng, size).save(os.path.join(dir, f"class{i % classes}", f"photo{i:06d}.jpg"), quality=quality)
    return dir
