"""Reading a packed data set: tar shards and one index, without a file per image.

``python -m data_pipeline.pack SRC DST`` writes the set (:mod:`data_pipeline.pack`):
``DST/shard-NNNNNN.tar`` are plain tar files whose members are ``<key>.jpg`` (the
image's bytes) and ``<key>.cls`` (its label as a decimal number), the key being the
image's position in SRC's listing; ``DST/index.npz`` holds the classes, the shards'
names and sizes, and per sample -- in SRC's listing order, so sample ``i`` is the
folder's image ``i`` -- its shard, the byte offset and size of its data there, its
label and its key. The index is the last thing a pack writes: a folder without it is
not a data set.

A rank reads the index once and checks the shards' sizes; nothing is listed or
stat'ed per image (packing checked every image). A sample is then one ``os.preadv``
from its shard, opened at its first read and kept open, so the files a rank opens
in an epoch are the shards, not the images.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import weakref
import zipfile
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.folder import ImageList, list_images, match_classes

__all__ = ["INDEX", "WORK", "ImageSet", "PackedImages", "ShardFiles", "load_packed", "member_key", "open_images",
           "shard_name"]

INDEX = "index.npz"
WORK = ".packing"  # the unfinished pack's plan, records and shard being written; gone once the index is there
FORMAT_VERSION = 1


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def member_key(key: int) -> str:
    """A sample's key in the tar members' names (WebDataset groups ``<key>.jpg`` with ``<key>.cls``)."""
    return f"{key:08d}"


class ShardFiles:
    """A packed set's shard files, each opened at its first read and kept open.

    A copy (another rank's, by pickling; a forked worker's) opens its own; the files
    are closed when the object is collected.
    """

    def __init__(self, root: str, names: list[str], sizes: np.ndarray) -> None:
        self.root, self.names, self.sizes = root, list(names), np.asarray(sizes, np.int64)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()  # two threads meeting an unopened shard open it once
        weakref.finalize(self, _close_all, self._fds)

    def __reduce__(self):
        return ShardFiles, (self.root, self.names, self.sizes)

    def path(self, shard: int) -> str:
        return os.path.join(self.root, self.names[shard])

    def check(self) -> None:
        """DataError unless every shard is there at the size the index gives (one stat per shard)."""
        for shard in range(len(self.names)):
            try:
                size = os.stat(self.path(shard)).st_size
            except OSError as e:
                raise DataError(f"cannot read shard {self.path(shard)}: {e.strerror}; the pack is incomplete "
                                "(copy it again, or pack again)") from None
            self._check_size(shard, size)

    def read(self, shard: int, offset: int, size: int) -> np.ndarray:
        """``size`` bytes at ``offset`` of ``shard``: one ``preadv`` straight into a (writable) array."""
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._open(shard)
        out = np.empty(size, np.uint8)
        if os.preadv(fd, [out], int(offset)) != size:
            raise DataError(f"{self.path(shard)} ends before the sample at byte {offset}: the shard is damaged; "
                            "pack again")
        return out

    def _open(self, shard: int) -> int:
        with self._lock:
            if shard not in self._fds:
                try:
                    fd = os.open(self.path(shard), os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    more = (f" (a rank keeps all {len(self.names)} shards open: raise `ulimit -n`, or pack with "
                            "fewer --shards)") if e.errno == errno.EMFILE else ""
                    raise DataError(f"cannot open {self.path(shard)}: {e.strerror}{more}") from None
                self._fds[shard] = fd
                self._check_size(shard, os.fstat(fd).st_size)
            return self._fds[shard]

    def _check_size(self, shard: int, size: int) -> None:
        if size != self.sizes[shard]:
            raise DataError(f"{self.path(shard)} is {size} bytes but the index says {self.sizes[shard]}: the shard "
                            "is damaged or still being copied; copy it again, or pack again")


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


@dataclass
class PackedImages:
    """A packed set with the face of :class:`~data_pipeline.folder.ImageList`: ``labels``,
    ``classes``, ``root``, ``missing_classes``, ``len``, ``read(i)`` and ``name(i)``."""

    root: str
    classes: list[str]
    labels: np.ndarray  # int64, one per sample
    shard: np.ndarray  # per sample: its shard's number
    offset: np.ndarray  # per sample: its data's byte offset in the shard
    size: np.ndarray  # per sample: its data's size in bytes
    key: np.ndarray  # per sample: its key (the image's position in the packed folder's listing)
    shard_files: ShardFiles = field(repr=False, compare=False)
    missing_classes: list[str] = field(default_factory=list)  # of ``classes``, those without samples here

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> np.ndarray:
        """Sample ``i``'s encoded bytes, as DALI's external source takes them."""
        return self.shard_files.read(self.shard[i], self.offset[i], self.size[i])

    def name(self, i: int) -> str:
        """Where sample ``i`` lives, for messages: its shard and key."""
        return f"{self.shard_files.path(self.shard[i])} (key {member_key(self.key[i])})"


ImageSet = ImageList | PackedImages


def open_images(root: str | os.PathLike, classes: list[str] | None = None) -> ImageSet:
    """The data set at ``root``: a packed set (recognised by its index) or an ImageFolder tree.

    ``classes`` as for :func:`~data_pipeline.folder.list_images`: a validation set's
    labels follow the training set's class names.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if os.path.isfile(os.path.join(root, INDEX)):
        return load_packed(root, classes)
    if os.path.isdir(os.path.join(root, WORK)):
        raise DataError(f"{root} is an unfinished pack (interrupted, or stopped by a bad file): run "
                        f"`python -m data_pipeline.pack {_source_of(root)} {root}` again to finish it")
    return list_images(root, classes)


def _source_of(root: str) -> str:
    """The folder an unfinished pack at ``root`` is made from, as its plan names it."""
    try:
        with open(os.path.join(root, WORK, "plan.json")) as f:
            return json.load(f)["options"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return "SRC"


def load_packed(root: str, classes: list[str] | None = None) -> PackedImages:
    """The packed set at ``root`` from its index; DataError if the index or a shard is not as packed."""
    index = os.path.join(root, INDEX)
    try:
        with np.load(index, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        version = int(arrays["version"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read the index {index} ({e}): pack again") from None
    if version != FORMAT_VERSION:
        raise DataError(f"{index} is of format {version}, this version reads {FORMAT_VERSION}: pack again")
    own = arrays["classes"].tolist()
    classes, missing = match_classes(root, own, classes, noun="classes")
    files = ShardFiles(root, arrays["shards"].tolist(), arrays["shard_bytes"])
    files.check()
    labels = np.array([classes.index(c) for c in own], np.int64)[arrays["label"]]
    return PackedImages(root, classes, labels, arrays["shard"], arrays["offset"], arrays["size"], arrays["key"],
                        files, missing)
