"""Down-sample an image folder the way the paper did, once, before training.

    python -m data_pipeline.downsample SRC DST [--size 256] [--quality 90] [--workers N]

"Given a rectangular image, we first rescaled the image such that the shorter side was
of length 256, and then cropped out the central 256x256 patch from the resulting image"
(Krizhevsky et al. 2012, section 2). Every image under ``SRC/<class>/`` is written as a
JPEG to the same place under ``DST`` (other suffixes become ``.jpg``). Training on the
copy draws the same random 224 crops as the paper, and costs the input pipeline far less
CPU: it decodes a fraction of each photograph's pixels, and since the shorter side then
equals ``data.resize`` its resize is an exact copy (docs/BENCHMARKS.md). Keep
``data.resize`` at ``--size``.

Each file is written under a temporary name and renamed, and files already in ``DST``
are kept, so an interrupted run is finished by running it again. Files that do not
decode are named at the end and make the exit status 1.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from PIL import Image, ImageOps
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.folder import list_images, name_some
from data_pipeline.fsutil import write_atomically
from data_pipeline.scan import check_image

__all__ = ["downsample_bytes", "downsample_folder", "downsample_image"]

_JPEG_SUFFIXES = (".jpg", ".jpeg")


def downsample_bytes(src: str, size: int, quality: int) -> tuple[bytes | None, str | None]:
    """``src`` rescaled (shorter side ``size``) and centre-cropped to ``size`` x ``size``, as a
    JPEG: (its bytes, None), or (None, why ``src`` could not be read, in a few words)."""
    try:
        with Image.open(src) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale still >= size
            upright = ImageOps.exif_transpose(im.convert("RGB"))  # as DALI's decoder shows it
        square = ImageOps.fit(upright, (size, size), Image.Resampling.BICUBIC)  # centre crop of the aspect, scaled
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # Pillow's broken-stream errors
        return None, check_image(src) or f"cannot decode: {e}"  # the scan's words for what is wrong
    out = io.BytesIO()
    square.save(out, "JPEG", quality=quality)
    return out.getvalue(), None


def downsample_image(src: str, dst: str, size: int, quality: int) -> str | None:
    """Write :func:`downsample_bytes` of ``src`` at ``dst``; None, or why ``src`` could not be read."""
    data, why = downsample_bytes(src, size, quality)
    if data is not None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        write_atomically(dst, data)
    return why


def _target(src_root: str, dst_root: str, path: str) -> str:
    rel = os.path.relpath(path, src_root)
    stem, suffix = os.path.splitext(rel)
    return os.path.join(dst_root, rel if suffix.lower() in _JPEG_SUFFIXES else stem + ".jpg")


def _one(job: tuple[str, str, int, int]) -> tuple[str, str | None]:
    src, dst, size, quality = job
    return src, downsample_image(src, dst, size, quality)


def downsample_folder(src: str, dst: str, size: int = 256, quality: int = 90,
                      workers: int | None = None) -> tuple[int, int, list[str]]:
    """(files written, files already there, ``path (why)`` of each file that did not decode)."""
    images = list_images(src)
    dst = os.path.abspath(os.path.expanduser(dst))
    if os.path.commonpath([images.root, dst]) in (images.root, dst):
        raise DataError(f"{dst} and {images.root} overlap: write the copy outside the source folder")
    jobs = [(f, _target(images.root, dst, f), size, quality) for f in images.files]
    clash = sorted(t for t, n in Counter(j[1] for j in jobs).items() if n > 1)  # a.png beside a.jpg
    if clash:
        raise DataError(f"files under {images.root} would share a name in the copy: {name_some(clash)}")
    todo = [j for j in jobs if not os.path.exists(j[1])]
    failed = []
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        for path, why in tqdm(pool.map(_one, todo, chunksize=16), total=len(todo), disable=None,  # a bar on terminals only
                              desc="downsample", unit="img"):
            if why:
                failed.append(f"{os.path.relpath(path, images.root)} ({why})")
    return len(todo) - len(failed), len(jobs) - len(todo), failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.downsample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("src", help="image folder in ImageFolder layout (SRC/<class>/<image>)")
    parser.add_argument("dst", help="where the copy goes (created; files already there are kept)")
    parser.add_argument("--size", type=int, default=256, help="side of the square images (the paper: 256)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the copies")
    parser.add_argument("--workers", type=int, default=None, help="processes; unset: one per core")
    args = parser.parse_args(argv)
    if args.size < 1 or not 1 <= args.quality <= 100 or (args.workers is not None and args.workers < 1):
        parser.error("--size and --workers must be positive, --quality within 1..100")
    try:
        written, kept, failed = downsample_folder(args.src, args.dst, args.size, args.quality, args.workers)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written} images of {args.size}x{args.size} to {args.dst}" + (f", kept {kept} already there" if kept else ""))
    if failed:
        print(f"error: {len(failed)} files did not decode and were left out: {name_some(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
