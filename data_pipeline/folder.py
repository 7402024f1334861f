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

__all__ = ["IMAGE_EXTENSIONS", "ImageList", "list_images", "match_classes"]

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
    missing_classes: list[str] = field(default_factory=list)  # of ``classes``, those without a folder here

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.files):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        """Sample ``i``'s encoded bytes, as DALI's external source takes them."""
        try:
            return np.fromfile(self.files[i], dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot read {self.files[i]}: {e.strerror}") from None

    def name(self, i: int) -> str:
        """Where sample ``i`` lives, for messages."""
        return self.files[i]

    def select(self, keep: np.ndarray) -> ImageList:
        """The files where the boolean mask ``keep`` is true; classes unchanged."""
        files = [f for f, k in zip(self.files, keep) if k]
        return ImageList(files, self.labels[keep], self.classes, self.ignored, self.root, self.missing_classes)

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


def list_images(root: str | os.PathLike, classes: list[str] | None = None) -> ImageList:
    """Every image under ``root`` in ImageFolder layout; DataError naming what is missing.

    ``classes`` (a validation set: the training set's class names) fixes the labels by
    name: a folder not among them is refused, and one of them without a folder here has
    no images (:attr:`ImageList.missing_classes`). Links are followed, but each real
    file is listed once and a folder that links back to itself is refused.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist (expected root/<class>/<image>.jpg)")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root}: expected ImageFolder layout root/<class>/<image>.jpg")
    classes, missing = match_classes(root, folders, classes)
    files, labels, ignored, empty, seen = [], [], [], [], {}
    for name in folders:
        images, others = _walk(os.path.join(root, name), root, seen)
        files += images
        labels += [classes.index(name)] * len(images)
        ignored += others
        if not images:
            empty.append(name)
    if not files:
        raise DataError(f"no JPEG images under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if empty:
        raise DataError(f"class folder {os.path.join(root, empty[0])} holds no images ({len(empty)} empty in all)")
    rel = os.path.relpath
    return ImageList(files, np.array(labels, dtype=np.int64), classes, [rel(f, root) for f in ignored], root,
                     missing)


def match_classes(root: str, found: list[str], classes: list[str] | None,
                  noun: str = "class folders") -> tuple[list[str], list[str]]:
    """(the classes labels index, those of them ``root`` has no images of).

    ``found``: the classes ``root`` holds; ``classes``: the training set's, for a
    validation set (None for a training set: ``found`` itself). Matched by name, never
    by position; a class the training set lacks is refused.

    >>> match_classes("val", ["b", "c"], ["a", "b", "c"])
    (['a', 'b', 'c'], ['a'])
    """
    if classes is None:
        return list(found), []
    if unknown := sorted(set(found) - set(classes)):
        raise DataError(f"{root} has {noun} the training set does not: {name_some(unknown)} "
                        f"({len(unknown)} in all); validation classes are matched by name")
    return list(classes), [c for c in classes if c not in found]


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk(folder: str, root: str, seen: dict[tuple[int, int], str]) -> tuple[list[str], list[str]]:
    """(image files, other files) under the class folder ``folder``, recursively, sorted by
    path. Links are followed; a folder that is one of its own ancestors (or the data
    root) is a loop and refused; a real file reached twice is listed once, and one that
    two classes share is refused (``seen``: real file -> its first path)."""
    images, others = [], []
    above = {os.path.dirname(folder): frozenset({_identity(root)})}  # folder identities from the root down
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here, chain = _identity(dirpath), above[os.path.dirname(dirpath)]
        if here in chain:
            raise DataError(f"{dirpath} is a link back to a folder above it (a loop): the listing would never "
                            "end; remove the link")
        above[dirpath] = chain | {here}
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                key = _identity(path)
            except OSError:  # a dangling link: listed, and the scan names it
                key = None
            if key in seen:
                if os.path.dirname(os.path.relpath(seen[key], root)).split(os.sep)[0] != os.path.basename(folder):
                    raise DataError(f"{path} and {seen[key]} are the same file in two classes: a sample has one label")
                continue
            if key is not None:
                seen[key] = path
            is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            (images if is_image else others).append(path)
    return images, others
