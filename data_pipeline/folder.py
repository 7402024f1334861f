"""Listing an ImageFolder tree: ``root/<class>/**/<image>``, sorted and deterministic.

Classes are the sorted sub-folders of ``root`` (hidden ones left out); their index is
the label, as with torchvision's ``ImageFolder``. Files whose extension is not an image
format the decoders read (``.txt``, ``.DS_Store``, ...) are left out and kept in
:attr:`ImageList.ignored` so the caller can name them once.

>>> lst = ImageList(["r/a/1.jpg", "r/b/2.jpg", "r/b/3.jpg"], np.array([0, 1, 1]), ["a", "b"], [], "r")
>>> len(lst), lst.select(np.array([False, True, True])).files
(3, ['r/b/2.jpg', 'r/b/3.jpg'])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageList", "list_images"]

# Formats both the scan's decoder (Pillow) and DALI's CPU and GPU decoders read.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp"})
_SHOWN = 5  # names spelled out in one-line messages


@dataclass
class ImageList:
    """Image files with their class labels, in a fixed order (the sample index is the position)."""

    files: list[str]
    labels: np.ndarray  # int64, one per file
    classes: list[str]
    ignored: list[str] = field(default_factory=list)  # non-image files left out by extension
    root: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.files):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.files)

    def select(self, keep: np.ndarray) -> ImageList:
        """The files where the boolean mask ``keep`` is true; classes unchanged."""
        files = [f for f, k in zip(self.files, keep) if k]
        return ImageList(files, self.labels[keep], self.classes, self.ignored, self.root)

    def ignored_summary(self) -> str:
        """One line naming the non-image files left out, or "" when there are none."""
        if not self.ignored:
            return ""
        return f"left out {len(self.ignored)} non-image files under {self.root}: {name_some(self.ignored)}"


def name_some(items: list[str], shown: int = _SHOWN) -> str:
    """``a, b, c and 7 more``: a list short enough for one line.

    >>> name_some(["a", "b"]), name_some(list("abcdefg"), shown=3)
    ('a, b', 'a, b, c and 4 more')
    """
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


def list_images(root: str | os.PathLike) -> ImageList:
    """Every image under ``root`` in ImageFolder layout; DataError naming what is missing."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist (expected root/<class>/<image>.jpg)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root}: expected ImageFolder layout root/<class>/<image>.jpg")
    files, labels, ignored, empty = [], [], [], []
    for label, name in enumerate(classes):
        images, others = _walk(os.path.join(root, name))
        files += images
        labels += [label] * len(images)
        ignored += others
        if not images:
            empty.append(name)
    if not files:
        raise DataError(f"no JPEG images under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if empty:
        raise DataError(f"class folder {os.path.join(root, empty[0])} holds no images ({len(empty)} empty in all)")
    rel = os.path.relpath
    return ImageList(files, np.array(labels, dtype=np.int64), classes, [rel(f, root) for f in ignored], root)


def _walk(folder: str) -> tuple[list[str], list[str]]:
    """(image files, other files) under ``folder``, recursively, sorted by path."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            (images if is_image else others).append(os.path.join(dirpath, name))
    return images, others
