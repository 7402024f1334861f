"""RGB eigenvalues and eigenvectors of a training set, for the paper's PCA colour noise.

``python -m data_pipeline.pca DIR --out pca.json`` samples pixels from the training
set at ``DIR`` (a folder in ImageFolder layout, or a packed set), takes the 3x3
covariance of their RGB values on the 0..1 scale and writes its eigen decomposition
as JSON (see :mod:`data_pipeline.eigen`); ``data.pca`` names that file.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipeline.eigen import save_eigen
from data_pipeline.errors import DataError
from data_pipeline.packed import ImageSet, open_images

__all__ = ["compute_eigen", "main"]

_SAMPLE_SIDE = 128  # decode at about this size: colour statistics barely change, decoding is 4-16x faster


def compute_eigen(
    images: ImageSet, *, num_images: int = 2000, pixels_per_image: int = 1000, seed: int = 0,
    workers: int | None = None, progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Eigen decomposition of the RGB covariance over sampled pixels: (eigval desc, eigvec columns, images used)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=min(num_images, len(images)), replace=False)
    seeds = rng.integers(0, 2**31, size=len(chosen))
    jobs = [(images, i, pixels_per_image, s) for i, s in zip(chosen, seeds)]
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        results = pool.map(_sample_pixels, *zip(*jobs))
        bar = tqdm(results, total=len(jobs), desc="PCA pixels", unit="img", disable=None if progress else True)  # no bar when not on a terminal
        samples = [p for p in bar if p is not None]
    if not samples:
        raise DataError(f"none of the {len(jobs)} sampled images under {images.root} could be decoded")
    eigval, eigvec = np.linalg.eigh(np.cov(np.concatenate(samples), rowvar=False))
    order = np.argsort(eigval)[::-1]
    return eigval[order], eigvec[:, order], len(samples)


def _sample_pixels(images: ImageSet, i: int, count: int, seed: int) -> np.ndarray | None:
    """``count`` random RGB pixels of image ``i`` on the 0..1 scale; None if it does not decode."""
    try:
        with Image.open(io.BytesIO(images.read(i))) as im:
            im.draft("RGB", (_SAMPLE_SIDE, _SAMPLE_SIDE))
            pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    except (OSError, ValueError, Image.DecompressionBombError):  # DataError (unreadable) is a ValueError
        return None
    pick = np.random.default_rng(seed).integers(0, len(pixels), size=count)
    return pixels[pick] / 255.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.pca", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("dir", help="training set: a folder in ImageFolder layout, or a packed set "
                        "(python -m data_pipeline.pack)")
    parser.add_argument("--out", default="pca.json", help="JSON file to write (name it in data.pca)")
    parser.add_argument("--images", type=int, default=2000, help="images sampled")
    parser.add_argument("--pixels", type=int, default=1000, help="pixels sampled per image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    args = parser.parse_args(argv)
    try:
        images = open_images(args.dir)
        eigval, eigvec, used = compute_eigen(
            images, num_images=args.images, pixels_per_image=args.pixels, seed=args.seed
        )
        save_eigen(args.out, eigval, eigvec, source=images.root, images=used, pixels_per_image=args.pixels)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: eigval {np.round(eigval, 4).tolist()} from {used} images of {images.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
