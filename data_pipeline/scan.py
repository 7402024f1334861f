"""Finding the files that are not decodable images, before DALI meets them mid-epoch.

Every file is opened and fully decoded by Pillow, at reduced size where JPEG's DCT
scaling allows it (``Image.draft``): the entropy-coded data is still read to the
end, so a truncated or corrupt stream fails just as a full decode would, at a
fraction of the time. Results are cached per file by (size, mtime), so a second
start over 1.28 million unchanged files only stats them. The cache is one JSON
file per data root, rewritten atomically; a lock file makes concurrent callers on
one node take turns, so the second finds the first's results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.folder import ImageList, name_some
from data_pipeline.fsutil import locked, write_atomically

__all__ = ["DALI_FORMATS", "check_image", "file_stamps", "scan_and_filter"]

# Pillow's names of the formats DALI's decoders read (MPO: camera JPEGs with extra frames).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
_CACHE_VERSION = 2


def check_image(path: str) -> str | None:
    """Why ``path`` is not a decodable image (a few words), or None if it decodes."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            if im.format not in DALI_FORMATS:
                return f"{im.format} format, which DALI does not decode"
            im.draft("RGB", (1, 1))  # smallest DCT scale; every coefficient is still decoded
            im.load()
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError:
        return "too many pixels to decode safely"
    except (FileNotFoundError, PermissionError) as e:
        return f"cannot read: {e.strerror}"
    except (OSError, ValueError, SyntaxError) as e:  # Pillow raises all three for broken streams
        return "truncated" if "truncated" in str(e).lower() else f"cannot decode: {e}"
    return None


def scan_and_filter(
    images: ImageList, policy: str = "error", cache_dir: str = "~/.cache/alexnet-dist",
    workers: int | None = None, progress: bool = True,
) -> ImageList:
    """Check every file decodes; ``policy`` 'error' raises DataError naming the bad ones, 'skip' drops them."""
    if policy not in ("error", "skip"):
        raise DataError(f"data.on_bad_file must be 'error' or 'skip', got {policy!r}")
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha1(os.path.realpath(images.root or os.path.commonpath(images.files)).encode()).hexdigest()[:16]
    with locked(os.path.join(cache_dir, f"scan-{key}.lock")):
        reasons = _scan(images.files, os.path.join(cache_dir, f"scan-{key}.json"), workers, progress)
    bad = [(f, r) for f, r in zip(images.files, reasons) if r is not None]
    if not bad:
        return images
    listing = os.path.join(cache_dir, f"bad-files-{key}.txt")
    write_atomically(listing, "".join(f"{path}\t{reason}\n" for path, reason in bad))
    named = name_some([f"{os.path.relpath(p, images.root or '/')} ({r})" for p, r in bad])
    if policy == "error":
        raise DataError(
            f"{len(bad)} files are not decodable images: {named}; full list in {listing} "
            "(set data.on_bad_file=skip to train without them)"
        )
    if len(bad) == len(images):
        raise DataError(f"none of the {len(images)} files under {images.root} is a decodable image: {named}")
    print(f"skipping {len(bad)} of {len(images)} files that are not decodable images: {named}; "
          f"full list in {listing}", flush=True)
    return images.select(np.array([r is None for r in reasons]))


def _scan(files: list[str], cache_path: str, workers: int | None, progress: bool) -> list[str | None]:
    """Reason per file (None = decodes), from the cache where (size, mtime) still match."""
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:  # stat and Pillow release the GIL
        stamps = file_stamps(files, pool)
        cached_stamps, bad = _cached(cache_path, files)
        todo = np.flatnonzero((cached_stamps != stamps).any(axis=1))
        reasons: list[str | None] = [bad.get(f) for f in files]
        checked = pool.map(check_image, [files[i] for i in todo])
        bar = tqdm(checked, total=len(todo), desc="scanning images", unit="file", disable=None if progress else True)  # no bar when not on a terminal
        for i, reason in zip(todo, bar):
            reasons[i] = reason
    if len(todo):
        bad = {f: r for f, r in zip(files, reasons) if r is not None}
        _save_cache(cache_path, files, stamps, bad)
    return reasons


def file_stamps(files: list[str], pool: ThreadPoolExecutor) -> np.ndarray:
    """(size, mtime in ns) per file, stat'ed in chunks on ``pool``'s threads: what must match
    for a cached result to stand; (-1, -1) where a file cannot be stat'ed."""
    if not files:
        return np.zeros((0, 2), np.int64)
    return np.concatenate(list(pool.map(_stamps, _chunks(files, 4096))))


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _stamps(paths: list[str]) -> np.ndarray:
    out = np.full((len(paths), 2), -1, np.int64)
    for i, path in enumerate(paths):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            out[i] = st.st_size, st.st_mtime_ns
    return out


def _cached(path: str, files: list[str]) -> tuple[np.ndarray, dict[str, str]]:
    """The cached stamps of ``files`` ((-2, -2) where there are none: never a match) and the bad files' reasons.

    The cache is columnar JSON (one list of paths, one of sizes, one of mtimes), which
    loads in well under a second for 1.28 million files.
    """
    stamps = np.full((len(files), 2), -2, np.int64)
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != _CACHE_VERSION:
            return stamps, {}
        old = np.stack([np.asarray(data["sizes"], np.int64), np.asarray(data["mtimes"], np.int64)], axis=1)
        if data["paths"] == files:  # the usual case: the same folder again
            return old, data["bad"]
        where = {p: i for i, p in enumerate(data["paths"])}
        for i, f in enumerate(files):
            if f in where:
                stamps[i] = old[where[f]]
        return stamps, data["bad"]
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: scan again
        return stamps, {}


def _save_cache(path: str, files: list[str], stamps: np.ndarray, bad: dict[str, str]) -> None:
    data = {"version": _CACHE_VERSION, "paths": files, "sizes": stamps[:, 0].tolist(), "mtimes": stamps[:, 1].tolist(),
            "bad": bad}
    write_atomically(path, json.dumps(data, separators=(",", ":")))
