"""The RGB eigen decomposition behind the paper's PCA colour noise, and its file format.

Unset (``data.pca: null``), :func:`load_eigen` returns the ImageNet values of
Krizhevsky et al. (as in fb.resnet.torch's ``Lighting``) on the 0..1 pixel scale;
``python -m data_pipeline.pca DIR --out F`` writes the JSON file it reads otherwise.

>>> eigval, eigvec = load_eigen(None)
>>> eigval.round(4).tolist(), eigvec.shape
([0.2175, 0.0188, 0.0045], (3, 3))
"""

from __future__ import annotations

import json
import os

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.fsutil import write_atomically

__all__ = ["IMAGENET_EIGVAL", "IMAGENET_EIGVEC", "load_eigen", "save_eigen"]

IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.array([  # columns are the eigenvectors
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
])


def load_eigen(path: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    """(eigval (3,), eigvec (3, 3) with eigenvectors as columns) from ``path``, or ImageNet's."""
    if path is None:
        return IMAGENET_EIGVAL.copy(), IMAGENET_EIGVEC.copy()
    path = os.path.expanduser(os.fspath(path))
    try:
        with open(path) as f:
            data = json.load(f)
        eigval, eigvec = np.array(data["eigval"], float), np.array(data["eigvec"], float)
    except (OSError, ValueError, KeyError, TypeError) as e:
        fix = f"write one with: python -m data_pipeline.pca DIR --out {path}"
        raise DataError(f"cannot read PCA file {path} ({e}); {fix}") from None
    if eigval.shape != (3,) or eigvec.shape != (3, 3):
        got = f"{eigval.shape} and {eigvec.shape}"
        raise DataError(f"PCA file {path} needs eigval of 3 numbers and eigvec of 3x3, got {got}")
    return eigval, eigvec


def save_eigen(path: str, eigval: np.ndarray, eigvec: np.ndarray, **info: object) -> None:
    """Write the JSON that :func:`load_eigen` reads (atomically: a reader never sees half a file)."""
    data = {"eigval": eigval.tolist(), "eigvec": eigvec.tolist(), "scale": "RGB 0..1", "eigvec_layout": "columns"}
    data.update(info)
    write_atomically(path, json.dumps(data, indent=1))
