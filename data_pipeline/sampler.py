"""Which sample goes where, and its random augmentation: pure functions of the seed.

The equivalence promise needs a replica's batch, pixels included, to be the same
whatever the world layout. So nothing here looks at ranks: every epoch has one
permutation of all samples, seeded by ``(seed, epoch)``; global batch ``s`` is the
slice ``perm[s*G:(s+1)*G]`` and replica ``r`` takes its ``r``-th contiguous part. The
augmentation of the sample at epoch position ``k`` (crop window, flip, PCA alpha) is
drawn from a second stream seeded by ``(seed, epoch)`` and indexed by ``k``, so it does
not depend on which rank decodes it either.

>>> perm = epoch_permutation(10, seed=0, epoch=3)
>>> sorted(perm.tolist()) == list(range(10)), bool((perm == epoch_permutation(10, 0, 3)).all())
(True, True)
>>> one = replica_positions(step=1, micro_batch_size=4, replica=0, num_replicas=1)
>>> two = [replica_positions(1, 2, r, 2) for r in range(2)]
>>> one.tolist(), np.concatenate(two).tolist()
([4, 5, 6, 7], [4, 5, 6, 7])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Augmentation", "draw_augmentation", "epoch_permutation", "pca_shift", "replica_positions"]

PCA_ALPHA_STD = 0.1  # the paper's sigma for the colour-noise coefficients
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1  # separate seed streams: changing one leaves the other


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation of ``range(num_samples)``."""
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(num_samples)


def replica_positions(step: int, micro_batch_size: int, replica: int, num_replicas: int) -> np.ndarray:
    """Epoch positions of replica ``replica``'s micro batch at ``step``."""
    start = (step * num_replicas + replica) * micro_batch_size
    return np.arange(start, start + micro_batch_size)


@dataclass(frozen=True)
class Augmentation:
    """Per-sample augmentation parameters (arrays of equal length)."""

    crop_x: np.ndarray  # float32 in [0, 1]: where the crop window sits, 0 = left edge, 1 = right edge
    crop_y: np.ndarray  # float32 in [0, 1]: 0 = top, 1 = bottom
    flip: np.ndarray  # int32, 1 = mirror left-right
    alpha: np.ndarray  # float32 (n, 3): PCA colour-noise coefficients

    def take(self, positions: np.ndarray) -> Augmentation:
        return Augmentation(self.crop_x[positions], self.crop_y[positions], self.flip[positions], self.alpha[positions])


def draw_augmentation(num_samples: int, seed: int, epoch: int, augment: bool) -> Augmentation:
    """Parameters for every epoch position; ``augment=False``: centre crop, no flip, no noise.

    >>> a = draw_augmentation(4, seed=0, epoch=0, augment=False)
    >>> a.crop_x.tolist(), a.flip.tolist(), float(abs(a.alpha).max())
    ([0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0], 0.0)
    """
    if not augment:
        centre = np.full(num_samples, 0.5, np.float32)
        return Augmentation(centre, centre, np.zeros(num_samples, np.int32), np.zeros((num_samples, 3), np.float32))
    rng = np.random.default_rng([seed, epoch, _AUGMENT_STREAM])
    crop = rng.random((2, num_samples), dtype=np.float32)
    flip = (rng.random(num_samples) < 0.5).astype(np.int32)
    alpha = rng.normal(0.0, PCA_ALPHA_STD, (num_samples, 3)).astype(np.float32)
    return Augmentation(crop[0], crop[1], flip, alpha)


def pca_shift(alpha: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray) -> np.ndarray:
    """The paper's colour noise ``eigvec @ (alpha * eigval)`` per sample: (n, 3) RGB, 0..1 scale.

    ``eigvec`` holds the eigenvectors as columns.

    >>> pca_shift(np.array([[1.0, 0, 0]]), np.array([2.0, 1, 1]), np.eye(3)).tolist()
    [[2.0, 0.0, 0.0]]
    """
    return (alpha * eigval) @ np.asarray(eigvec).T
