"""Pack an image folder into tar shards and one index: a data set read without a file per image.

    python -m data_pipeline.pack SRC DST [--shards N] [--resize 256] [--workers K] [--on-bad-file error|skip]

Every image under ``SRC/<class>/`` (the listing ``data.train_dir`` would use) is
checked once, as the scan before training checks it, and stored in one of N plain
tar shards of roughly equal size, as ``<key>.jpg`` (its bytes, or with ``--resize``
the paper's 256x256 preparation, as ``data_pipeline.downsample`` writes it) and
``<key>.cls`` (its label): ``tar``, WebDataset and DALI's webdataset reader read
them. ``DST/index.npz`` then records where every sample lies (see
:mod:`data_pipeline.packed`); ``data.train_dir`` / ``data.val_dir`` take DST.

Shards hold a fixed random mix of the classes (readers that shuffle within a buffer
need that); the index keeps SRC's listing order, so training on DST draws the same
batches as training on SRC. Parallel over cores: worker processes check (and
down-sample) the images, this process writes the shards one after another.

Atomic and resumable: the plan, the finished shards' records and the shard being
written live in ``DST/.packing`` until the index is written, last, under a temporary
name. An interrupted pack is refused by training as unfinished; run the same command
again and it keeps the shards already finished, provided SRC's files (names, sizes,
modification times) and the options are unchanged; if the files changed, it packs
every shard again. With ``--on-bad-file error`` a file that is not a decodable image
stops the pack before its index (all of them named); fix them and run again, or run
again with ``skip`` to pack the rest without them (listed in ``DST/skipped.txt``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data_pipeline.downsample import downsample_bytes
from data_pipeline.errors import DataError
from data_pipeline.folder import ImageList, list_images, name_some
from data_pipeline.fsutil import write_atomically
from data_pipeline.packed import FORMAT_VERSION, INDEX, WORK, member_key, shard_name
from data_pipeline.scan import check_image, file_stamps

__all__ = ["PackReport", "main", "pack"]

SHARD_BYTES = 512 * 2**20  # default shard size, of source bytes: few enough shards to keep open, many for readers
_CHUNK = 32  # images per task handed to a worker


@dataclass
class PackReport:
    """What :func:`pack` did."""

    images: int  # samples in the index
    classes: int
    shards: int
    bytes: int  # of all shards
    kept: int  # shards an earlier run had finished, kept
    restarted: bool  # an unfinished pack of changed files was packed again from the start
    skipped: list[str]  # ``path (why)`` of each file left out
    ignored: str  # the listing's line on non-image files, or ""


@dataclass
class _Plan:
    """Which images go into which shard, and the fingerprint that must match to reuse a shard."""

    options: dict  # what the command asked for; an unfinished pack is finished only with the same
    members: list[np.ndarray]  # per shard: the listing positions of its images, ascending
    fingerprint: str  # of the listing, the files' sizes and times, and the options


def pack(src: str, dst: str, *, shards: int | None = None, resize: int | None = None, quality: int = 90,
         workers: int | None = None, on_bad_file: str = "error", progress: bool = True) -> PackReport:
    """Pack the image folder ``src`` into ``dst`` (see the module's text); DataError for every bad input."""
    if on_bad_file not in ("error", "skip"):
        raise DataError(f"--on-bad-file must be 'error' or 'skip', got {on_bad_file!r}")
    images = list_images(src)
    dst = os.path.abspath(os.path.expanduser(dst))
    if os.path.commonpath([images.root, dst]) in (images.root, dst):
        raise DataError(f"{dst} and {images.root} overlap: write the pack outside the source folder")
    with ThreadPoolExecutor(workers or os.cpu_count()) as threads:  # stat releases the GIL
        stamps = file_stamps(images.files, threads)
    plan = _plan(images, stamps, dict(source=images.root, shards=shards, resize=resize, quality=quality))
    restarted = _claim(dst, plan)
    work = os.path.join(dst, WORK)
    finished = [_finished(dst, s, plan.fingerprint) for s in range(len(plan.members))]
    todo = [s for s, done in enumerate(finished) if not done]
    _write_shards(images, plan, dst, todo, resize, quality, workers, progress)
    records = [_load_record(os.path.join(work, _record_name(s))) for s in range(len(plan.members))]
    skipped = [f"{os.path.relpath(images.files[k], images.root)} ({why})"
               for r in records for k, why in zip(r["bad_key"].tolist(), r["bad_why"].tolist())]
    _refuse_bad(images, skipped, on_bad_file, work)  # before the index: a refused pack stays unfinished
    total = _write_index(images, plan, records, dst, resize)
    if skipped:
        write_atomically(os.path.join(dst, "skipped.txt"), "".join(f"{line}\n" for line in skipped))
    shutil.rmtree(work)
    return PackReport(len(images) - len(skipped), len(images.classes), len(plan.members), total, sum(finished),
                      restarted, skipped, images.ignored_summary())


# ---------------------------------------------------------------- the plan and DST's state


def _plan(images: ImageList, stamps: np.ndarray, options: dict) -> _Plan:
    """Shards of roughly equal source bytes, each a fixed random mix of the classes."""
    n = len(images)
    count = options["shards"] or min(n, max(1, -(-int(stamps[:, 0].clip(0).sum()) // SHARD_BYTES)))
    if count > n:
        raise DataError(f"--shards {count} is more than the {n} images under {images.root}")
    order = np.random.default_rng(0).permutation(n)
    sizes = stamps[order, 0].clip(1).astype(np.float64)
    middle = np.cumsum(sizes) - sizes / 2  # each image goes where the middle of its bytes falls
    shard_of = np.minimum((middle * count / sizes.sum()).astype(np.int64), count - 1)
    grouped = order[np.argsort(shard_of, kind="stable")]
    members = [np.sort(part) for part in np.split(grouped, np.cumsum(np.bincount(shard_of, minlength=count))[:-1])]
    digest = hashlib.sha1(json.dumps([FORMAT_VERSION, options, count, images.classes]).encode())
    digest.update("\0".join(images.files).encode())
    digest.update(images.labels.tobytes())
    digest.update(stamps.tobytes())
    return _Plan(options, members, digest.hexdigest())


def _claim(dst: str, plan: _Plan) -> bool:
    """Make ``dst`` this pack's: new or empty, or an unfinished pack of the same source and
    options. True when that unfinished pack's files changed since and it starts again."""
    work, plan_file = os.path.join(dst, WORK), os.path.join(dst, WORK, "plan.json")
    if os.path.isfile(os.path.join(dst, INDEX)):
        raise DataError(f"{dst} already holds a finished pack; remove it, or choose another DST, to pack again")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise DataError(f"{dst} is a file, not a folder")
    restarted = False
    if os.path.isdir(work):
        options, fingerprint, count = _read_plan(plan_file)
        if options != plan.options:
            raise DataError(f"{dst} holds an unfinished pack {_options_text(options)}: run the command again with "
                            "those to finish it, or remove DST to start over")
        restarted = fingerprint != plan.fingerprint
        if restarted:  # files changed: no finished shard can be trusted
            for s in range(count):
                _remove(os.path.join(dst, shard_name(s)))
            shutil.rmtree(work)
    elif os.path.isdir(dst) and os.listdir(dst):
        raise DataError(f"{dst} is not empty and not an unfinished pack: choose an empty or new folder")
    if not os.path.isdir(work):
        os.makedirs(work)
        write_atomically(plan_file, json.dumps(dict(options=plan.options, fingerprint=plan.fingerprint,
                                                    shards=len(plan.members))))
    return restarted


def _read_plan(path: str) -> tuple[dict, str, int]:
    """(options, fingerprint, shard count) of an unfinished pack's plan."""
    try:
        with open(path) as f:
            plan = json.load(f)
        return plan["options"], plan["fingerprint"], int(plan["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path} is missing or damaged: remove {os.path.dirname(os.path.dirname(path))} "
                        "and pack again") from None


def _options_text(options: dict) -> str:
    shards = f"--shards {options['shards']}" if options["shards"] else "the default --shards"
    resize = f"--resize {options['resize']} --quality {options['quality']}" if options["resize"] else "no --resize"
    return f"of {options['source']} made with {shards} and {resize}"


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def _record_name(shard: int) -> str:
    return shard_name(shard) + ".npz"


def _finished(dst: str, shard: int, fingerprint: str) -> bool:
    """Whether an earlier run of this plan finished ``shard``: its record is there, of this
    plan, and the shard has the size the record gives."""
    path = os.path.join(dst, shard_name(shard))
    try:
        record = _load_record(os.path.join(dst, WORK, _record_name(shard)))
        return str(record["fingerprint"]) == fingerprint and os.path.getsize(path) == int(record["bytes"])
    except (OSError, ValueError, KeyError):
        return False


def _load_record(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _save_arrays(path: str, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


# ---------------------------------------------------------------- writing


def _write_shards(images: ImageList, plan: _Plan, dst: str, todo: list[int], resize: int | None, quality: int,
                  workers: int | None, progress: bool) -> None:
    """Write the shards ``todo``: workers check (and down-sample) the images in order, this process writes."""
    keys = [k for s in todo for k in plan.members[s].tolist()]
    jobs = [[(images.files[k], resize, quality) for k in keys[i:i + _CHUNK]] for i in range(0, len(keys), _CHUNK)]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(keys), desc="packing", unit="img", disable=None if progress else True)  # on terminals only
    with ProcessPoolExecutor(workers) as pool, bar:
        loaded = _in_order(pool, jobs, window=4 * workers)
        for s in todo:
            _write_shard(images, plan, dst, s, loaded, resize, bar)


def _in_order(pool: Executor, jobs: list[list[tuple]], window: int) -> Iterator[tuple[bytes | None, str | None]]:
    """Every job's results in order, with at most ``window`` jobs in flight: memory stays
    bounded however fast the workers run ahead of the writer."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_load_chunk, job))
        if len(pending) >= window:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def _load_chunk(jobs: list[tuple[str, int | None, int]]) -> list[tuple[bytes | None, str | None]]:
    return [_load(*job) for job in jobs]


def _load(path: str, resize: int | None, quality: int) -> tuple[bytes | None, str | None]:
    """(what to store, None) or (None, why the file is left out, in the scan's words)."""
    if resize:
        return downsample_bytes(path, resize, quality)
    why = check_image(path)
    if why:
        return None, why
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return None, f"cannot read: {e.strerror}"


def _write_shard(images: ImageList, plan: _Plan, dst: str, s: int, loaded: Iterator, resize: int | None,
                 bar: tqdm) -> None:
    """Shard ``s`` under WORK, its record, then the shard renamed into ``dst``: finished only when there."""
    partial = os.path.join(dst, WORK, shard_name(s))
    kept, offsets, sizes, bad, why_bad = [], [], [], [], []
    with open(partial, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key in plan.members[s].tolist():
                data, why = next(loaded)
                bar.update()
                if data is None:
                    bad.append(key)
                    why_bad.append(why)
                    continue
                kept.append(key)
                offsets.append(tar.offset + tarfile.BLOCKSIZE)  # a ustar header is one block
                sizes.append(len(data))
                _add(tar, f"{member_key(key)}.{_extension(images.files[key], resize)}", data)
                _add(tar, f"{member_key(key)}.cls", str(images.labels[key]).encode())
        f.flush()
        os.fsync(f.fileno())  # a shard counts as finished only once it is on disk
    _save_arrays(os.path.join(dst, WORK, _record_name(s)), fingerprint=np.array(plan.fingerprint),
                 bytes=np.array(os.path.getsize(partial)), key=np.array(kept, np.int64),
                 offset=np.array(offsets, np.int64), size=np.array(sizes, np.int64),
                 bad_key=np.array(bad, np.int64), bad_why=np.array(why_bad, dtype=str))
    os.replace(partial, os.path.join(dst, shard_name(s)))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member, with fixed owner, mode and time: the same files pack to the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def _extension(path: str, resize: int | None) -> str:
    """The member's extension: ``jpg`` for JPEGs (WebDataset's usual name), the file's own otherwise."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if resize or ext == "jpeg" else ext


def _refuse_bad(images: ImageList, skipped: list[str], on_bad_file: str, work: str) -> None:
    """With 'error', any bad file stops the pack before its index; with 'skip', only all of them being bad."""
    if not skipped:
        return
    listing = os.path.join(work, "bad-files.txt")
    write_atomically(listing, "".join(f"{line}\n" for line in skipped))
    if on_bad_file == "error":
        raise DataError(f"{len(skipped)} files are not decodable images: {name_some(skipped)}; full list in {listing}; "
                        "fix or remove them and run again, or run again with --on-bad-file skip to pack the rest")
    if len(skipped) == len(images):
        raise DataError(f"none of the {len(images)} files under {images.root} is a decodable image: "
                        f"{name_some(skipped)}")


def _write_index(images: ImageList, plan: _Plan, records: list[dict], dst: str, resize: int | None) -> int:
    """The index (see :mod:`data_pipeline.packed`), written last; the shards' bytes in all."""
    key = np.concatenate([r["key"] for r in records])
    shard = np.concatenate([np.full(len(r["key"]), s, np.int32) for s, r in enumerate(records)])
    order = np.argsort(key)  # the listing's order
    shard_bytes = np.array([int(r["bytes"]) for r in records], np.int64)
    _save_arrays(os.path.join(dst, INDEX), version=np.array(FORMAT_VERSION), source=np.array(images.root),
                 resize=np.array(resize or 0), classes=np.array(images.classes, dtype=str),
                 shards=np.array([shard_name(s) for s in range(len(records))], dtype=str), shard_bytes=shard_bytes,
                 shard=shard[order], offset=np.concatenate([r["offset"] for r in records])[order],
                 size=np.concatenate([r["size"] for r in records])[order].astype(np.int32),
                 label=images.labels[key[order]].astype(np.int32), key=key[order].astype(np.int32))
    return int(shard_bytes.sum())


# ---------------------------------------------------------------- the command


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m data_pipeline.pack --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m data_pipeline.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="image folder in ImageFolder layout (SRC/<class>/<image>)")
    parser.add_argument("dst", metavar="DST", help="where the pack goes: a new or empty folder, or an unfinished pack "
                        "of SRC to finish")
    parser.add_argument("--shards", type=int, metavar="N",
                        help=f"tar shards (default: one per {SHARD_BYTES // 2**20} MiB of source images)")
    parser.add_argument("--resize", type=int, metavar="SIDE", help="store each image the paper's way: shorter side "
                        "to SIDE, the central SIDE x SIDE kept, as a JPEG (the paper: 256; default: the files' own "
                        "bytes)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality with --resize (default: 90)")
    parser.add_argument("--workers", type=int, metavar="K", help="processes checking images (default: one per core)")
    parser.add_argument("--on-bad-file", choices=("error", "skip"), default="error",
                        help="a file that is not a decodable image: stop and name it, or leave it out "
                             "(default: error)")
    args = parser.parse_args(argv)
    for flag, value in (("--shards", args.shards), ("--resize", args.resize), ("--workers", args.workers)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be positive, got {value}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be within 1..100, got {args.quality}")
    try:
        report = pack(args.src, args.dst, shards=args.shards, resize=args.resize, quality=args.quality,
                      workers=args.workers, on_bad_file=args.on_bad_file)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the pack is unfinished; run the same command again to finish it", file=sys.stderr)
        return 130
    _say(report, args.dst)
    return 0


def _say(report: PackReport, dst: str) -> None:
    if report.ignored:
        print(report.ignored)
    if report.restarted:
        print("the source files changed since the unfinished pack began: packed every shard again")
    if report.skipped:
        print(f"skipped {len(report.skipped)} files that are not decodable images: {name_some(report.skipped)}; "
              f"full list in {os.path.join(dst, 'skipped.txt')}")
    kept = f", kept {report.kept} finished by an earlier run" if report.kept else ""
    print(f"packed {report.images} images of {report.classes} classes into {report.shards} shards "
          f"({report.bytes / 1e6:.1f} MB) at {dst}{kept}")


if __name__ == "__main__":
    sys.exit(main())
