"""The training and validation feeds: DALI decodes, the pair gathers, torch normalises.

A replica's batch is chosen by :mod:`data_pipeline.sampler` from ``(seed, epoch,
step)`` alone. With one tower per rank (``pair_size`` 2), pair rank ``p`` decodes the
``p``-th half of that batch and ``gather`` joins the pair's uint8 halves along dim 0 in
pair-rank order, so both towers hold the same bytes, and the batch equals what one
process holding both towers decodes (``pair_size`` 1, where ``gather`` is the
identity). The PCA colour noise and the normalisation follow on the device, in
float32, cast to ``dtype`` last. With ``decode_ahead`` > 0 the reads and DALI's work
run that many batches ahead on a worker thread per feed; the gather (a collective) and
the normalisation stay on the caller's thread, in order, so the batches are the same.

The package knows nothing of process groups: the trainer hands the feeds its pair's
all-gather (:func:`alexnet_dist.exchanges.gather_batch` bound to the pair's group).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import types
from collections.abc import Callable, Generator, Iterator

import numpy as np
import torch
from torch import Tensor

from data_pipeline.ahead import Ahead
from data_pipeline.errors import DataError
from data_pipeline.folder import name_some
from data_pipeline.eigen import load_eigen
from data_pipeline.packed import ImageSet
from data_pipeline.sampler import Augmentation, draw_augmentation, epoch_permutation, pca_shift, replica_positions

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SyntheticFeed", "TrainFeed", "ValFeed", "dali_missing", "load_dali"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
Eigen = tuple[np.ndarray, np.ndarray]
Gather = Callable[[Tensor], Tensor]  # this rank's part of a batch -> the pair's, joined along dim 0


def _alone(local: Tensor) -> Tensor:
    """The gather of a rank without a partner: its part is the whole batch."""
    return local


def load_dali() -> types.ModuleType:
    """:mod:`data_pipeline.pipelines`, importing DALI; DataError with the fix when that fails."""
    try:
        from data_pipeline import pipelines
    except (ImportError, OSError) as e:  # OSError: a DALI wheel whose shared libraries do not load
        raise DataError(f"NVIDIA DALI is not importable here ({e}): pip install nvidia-dali-cuda130") from None
    return pipelines


def dali_missing() -> str | None:
    """Why DALI cannot run here (the :func:`load_dali` error), or None."""
    try:
        load_dali()
    except DataError as e:
        return str(e)
    return None


class _Feed:
    """What both feeds share: the pair, the device, the DALI pipeline's life and the normalisation."""

    def __init__(self, images: ImageSet, *, pair_rank: int, pair_size: int, gather: Gather | None,
                 device: torch.device, dtype: torch.dtype, image_size: int, resize: int, num_threads: int,
                 prefetch: int, decode_ahead: int) -> None:
        if pair_size not in (1, 2) or not 0 <= pair_rank < pair_size:
            raise ValueError(f"pair rank {pair_rank} of {pair_size}: a pair holds 1 or 2 ranks")
        if pair_size > 1 and gather is None:
            raise ValueError("pair_size 2 needs the pair's gather")
        self.images, self.pair_rank, self.pair_size = images, pair_rank, pair_size
        self.gather = gather or _alone
        self.device, self.dtype = torch.device(device), dtype
        self.image_size, self.resize = image_size, resize
        self._pipeline_args = {"num_threads": num_threads, "prefetch_queue_depth": prefetch}
        if decode_ahead < 0:
            raise ValueError(f"decode_ahead {decode_ahead}: batches decoded ahead cannot be fewer than 0")
        self.decode_ahead = decode_ahead
        self._pipelines = load_dali()
        self._scale = torch.tensor(1 / IMAGENET_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._active: Generator | None = None

    def close(self) -> None:
        """End the running pass: its decoding worker, if any, stops and its DALI pipeline
        (threads and buffers) is freed."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, batches: Generator) -> Generator:
        """Make ``batches`` the running pass; one at a time, so at most one pipeline lives."""
        self.close()
        self._active = batches
        return batches

    def _open(self, graph, batches: Iterator, max_batch: int, **graph_args):
        """A DALI pipeline of ``graph`` over ``batches``."""
        gpu = self.device.type == "cuda"
        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return graph(batches, gpu=gpu, image_size=self.image_size, resize=self.resize, batch_size=max_batch,
                     device_id=device_id, **self._pipeline_args, **graph_args)

    def _decoded(self, graph, encoded: Iterator, names: Iterator[list[str]], max_batch: int,
                 **graph_args) -> Generator[Tensor]:
        """This rank's uint8 part of each batch: a DALI pipeline of ``graph`` over ``encoded``,
        opened at the first batch; ``names`` are each batch's samples, for the error."""
        pipe = self._open(graph, encoded, max_batch, **graph_args)
        for batch_names in names:
            yield self._decode(pipe, batch_names)

    @contextlib.contextmanager
    def _decoding(self, decoded: Generator[Tensor]) -> Generator[Iterator[Tensor]]:
        """``decoded``, made ``decode_ahead`` batches ahead on a worker thread (0: here, batch
        by batch); the worker stopped and the pipeline freed on leaving."""
        if not self.decode_ahead:
            with contextlib.closing(decoded):
                yield decoded
            return
        name = f"{type(self).__name__} decode ahead"
        with Ahead(self._complete(decoded), self.decode_ahead, name) as ahead:
            yield map(self._received, ahead)

    def _complete(self, decoded: Generator[Tensor]) -> Generator[Tensor]:
        """On the worker thread: ``decoded``, each batch complete when handed over. On a GPU
        DALI's output is copied on a stream of the worker's own, waited for before the next
        ``run`` (which may reuse the output's memory) and before the hand-over."""
        if self.device.type != "cuda":
            yield from decoded
            return
        side = torch.cuda.Stream(self.device)
        with contextlib.closing(decoded), torch.cuda.stream(side):  # the worker thread's current stream
            for local in decoded:
                side.synchronize()
                yield local

    def _received(self, local: Tensor) -> Tensor:
        """On the caller's thread: a batch from the worker, whose memory (allocated on the
        worker's stream) must not be reused before the caller's stream is done with it."""
        if local.is_cuda:
            local.record_stream(torch.cuda.current_stream(self.device))
        return local

    def _decode(self, pipe, names: list[str]) -> Tensor:
        """``pipe``'s next batch (whose samples are ``names``) as a uint8 tensor on the device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        try:
            (out,) = pipe.run()
        except RuntimeError as e:  # DALI names the sample's place in the batch, not its file
            found = re.search(r"sample #(\d+)", str(e))
            culprit = names[int(found[1])] if found and int(found[1]) < len(names) else f"a batch of {name_some(names)}"
            raise DataError(
                f"DALI could not decode {culprit}: it is broken, or changed since it was checked (the scan before "
                "training, data.scan, or packing); fix or remove it, or set data.on_bad_file=skip, and start again"
            ) from None
        dense = out.as_tensor()
        local = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(dense, local, cuda_stream=torch.cuda.current_stream(self.device) if local.is_cuda else None)
        return local

    def _normalise(self, batch: Tensor, shift: np.ndarray) -> Tensor:
        """``(batch + shift - mean) / std`` in float32, then cast; ``shift`` (n or 1, 3) on the 0..255 scale."""
        bias = torch.from_numpy(((shift - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32))
        bias = bias.view(-1, 3, 1, 1).to(self.device)
        # Convert first, then scale in place: faster than one mixed-type uint8 * float32
        # kernel once freed memory is kept (docs/BENCHMARKS.md), and the same numbers.
        return batch.float().mul_(self._scale).add_(bias).to(self.dtype)

    def _labels(self, indices: np.ndarray) -> Tensor:
        return torch.from_numpy(self.images.labels[indices]).to(self.device)

    def _read(self, indices: np.ndarray) -> list[np.ndarray]:
        """The encoded samples, as DALI's external source takes them."""
        return [self.images.read(i) for i in indices]

    def _names(self, indices: np.ndarray) -> list[str]:
        return [self.images.name(i) for i in indices]


class TrainFeed(_Feed):
    """A replica's training batches, augmented, identical on both ranks of a pair.

    Global batch ``s`` of epoch ``e`` is ``perm[s*G:(s+1)*G]`` of the epoch's permutation
    (``G = micro_batch_size * num_replicas``); replica ``r`` takes the ``r``-th
    ``micro_batch_size`` of it. The last partial global batch is dropped.
    """

    def __init__(self, images: ImageSet, *, micro_batch_size: int, seed: int, augment: bool, replica: int,
                 num_replicas: int, pair_rank: int, pair_size: int, gather: Gather | None = None,
                 device: torch.device, dtype: torch.dtype, image_size: int = 224, resize: int = 256,
                 eigen: Eigen | None = None, num_threads: int = 2, prefetch: int = 2, roi_decode: bool = True,
                 decode_ahead: int = 0) -> None:
        if micro_batch_size % pair_size:
            raise DataError(
                f"train.micro_batch_size ({micro_batch_size}) must be even: each tower of a pair decodes half"
            )
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica {replica} outside {num_replicas} replicas")
        global_batch = micro_batch_size * num_replicas
        if len(images) < global_batch:
            raise DataError(
                f"{len(images)} training images under {images.root or 'the list'} are fewer than one global "
                f"batch ({micro_batch_size} per replica x {num_replicas} replicas)"
            )
        super().__init__(images, pair_rank=pair_rank, pair_size=pair_size, gather=gather, device=device,
                         dtype=dtype, image_size=image_size, resize=resize, num_threads=num_threads, prefetch=prefetch,
                         decode_ahead=decode_ahead)
        self.micro_batch_size, self.seed, self.augment = micro_batch_size, seed, augment
        self.replica, self.num_replicas, self.roi_decode = replica, num_replicas, roi_decode
        self.steps_per_epoch = len(images) // global_batch
        self.num_samples = len(images)
        self.eigval, self.eigvec = eigen if eigen is not None else load_eigen(None)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) of steps ``start_step`` .. ``steps_per_epoch - 1`` of ``epoch``.

        Starting another epoch ends this one.
        """
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside the epoch's {self.steps_per_epoch} steps")
        return self._start(self._epoch(epoch, start_step))

    def _epoch(self, epoch: int, start_step: int) -> Generator[tuple[Tensor, Tensor]]:
        order = epoch_permutation(len(self.images), self.seed, epoch)
        aug = draw_augmentation(len(self.images), self.seed, epoch, self.augment)
        steps = range(start_step, self.steps_per_epoch)
        names = (self._names(order[self._mine(self._positions(step))]) for step in steps)
        decoded = self._decoded(self._pipelines.train_pipeline, self._encoded(order, aug, steps), names,
                                self.micro_batch_size // self.pair_size, roi_decode=self.roi_decode)
        with self._decoding(decoded) as halves:
            for step, local in zip(steps, halves):
                positions = self._positions(step)
                batch = self.gather(local)  # a collective: here, on the caller's thread, in step order
                shift = 255 * pca_shift(aug.alpha[positions], self.eigval, self.eigvec)
                yield self._normalise(batch, shift), self._labels(order[positions])

    def _positions(self, step: int) -> np.ndarray:
        return replica_positions(step, self.micro_batch_size, self.replica, self.num_replicas)

    def _mine(self, positions: np.ndarray) -> np.ndarray:
        """The half of the replica's positions this rank decodes (all of them without a partner)."""
        return np.array_split(positions, self.pair_size)[self.pair_rank]

    def _encoded(self, order: np.ndarray, aug: Augmentation, steps: range) -> Iterator[tuple]:
        """DALI's input per step: this rank's files and their crop and flip parameters."""
        for step in steps:
            mine = self._mine(self._positions(step))
            part = aug.take(mine)
            yield self._read(order[mine]), part.crop_x, part.crop_y, part.flip


class ValFeed(_Feed):
    """A replica's share of the validation set: every image on exactly one replica, once.

    Replica ``r`` evaluates images ``r, r + R, r + 2R, ...``. A batch's images are split
    between the pair (the first ``ceil(n / 2)`` to pair rank 0); the shorter half is
    padded for the gather and the padding cut off before the batch is yielded.
    """

    def __init__(self, images: ImageSet, *, batch_size: int, replica: int, num_replicas: int, pair_rank: int,
                 pair_size: int, gather: Gather | None = None, device: torch.device, dtype: torch.dtype,
                 image_size: int = 224, resize: int = 256, views: int = 1, num_threads: int = 2,
                 prefetch: int = 2, decode_ahead: int = 0) -> None:
        if views not in (1, 10):
            raise ValueError(f"views must be 1 (centre crop) or 10 (corners, centre and their mirrors), got {views}")
        super().__init__(images, pair_rank=pair_rank, pair_size=pair_size, gather=gather, device=device,
                         dtype=dtype, image_size=image_size, resize=resize, num_threads=num_threads, prefetch=prefetch,
                         decode_ahead=decode_ahead)
        self.batch_size, self.views = batch_size, views
        self._indices = np.arange(len(images))[replica::num_replicas]
        self.num_images = len(self._indices)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(images (n*views) x 3 x S x S, the views of an image consecutive; labels n)."""
        return self._start(self._batches())

    def _batches(self) -> Generator[tuple[Tensor, Tensor]]:
        chunks = [self._indices[i:i + self.batch_size] for i in range(0, self.num_images, self.batch_size)]
        max_half = math.ceil(self.batch_size / self.pair_size)
        encoded = (self._read(self._mine(chunk)) for chunk in chunks)
        names = (self._names(self._mine(chunk)) for chunk in chunks)
        decoded = self._decoded(self._pipelines.val_pipeline, encoded, names, max_half, views=self.views)
        no_shift = np.zeros((1, 3))
        with self._decoding(decoded) as halves:
            for chunk, local in zip(chunks, halves):
                local = local.view(-1, 3, self.image_size, self.image_size)
                # Full halves come first, so the real images are the first n (times views) rows.
                batch = self.gather(local)[: len(chunk) * self.views]
                yield self._normalise(batch, no_shift), self._labels(chunk)

    def _mine(self, chunk: np.ndarray) -> np.ndarray:
        """This rank's part of ``chunk``: its first or second half, padded with the chunk's last image
        to ``ceil(n / 2)`` so that both ranks gather equal tensors."""
        half = math.ceil(len(chunk) / self.pair_size)
        part = chunk[self.pair_rank * half:(self.pair_rank + 1) * half]
        return np.concatenate([part, np.full(half - len(part), chunk[-1])]).astype(np.int64)


class SyntheticFeed:
    """Generated batches in place of files (``data.synthetic``): no data set, no DALI.

    One batch per replica, standard-normal pixels and uniform labels drawn once from
    ``(seed, replica)`` -- so both towers of a pair hold it without an exchange -- and
    yielded every step from the device: the model, the exchanges and DeepSpeed at work
    without the input, for smoke tests of a cluster and for throughput. An epoch is
    ImageNet's training set in steps.
    """

    IMAGES_PER_EPOCH = 1_281_167

    def __init__(self, *, micro_batch_size: int, num_classes: int, seed: int, replica: int, num_replicas: int,
                 device: torch.device, dtype: torch.dtype, image_size: int = 224) -> None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + replica)
        x = torch.randn(micro_batch_size, 3, image_size, image_size, generator=generator)
        y = torch.randint(num_classes, (micro_batch_size,), generator=generator)
        self._batch = (x.to(device, dtype), y.to(device))
        self.steps_per_epoch = self.IMAGES_PER_EPOCH // (micro_batch_size * num_replicas)
        self.num_samples = self.IMAGES_PER_EPOCH

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch, once for each of steps ``start_step`` .. ``steps_per_epoch - 1``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside the epoch's {self.steps_per_epoch} steps")
        return itertools.repeat(self._batch, self.steps_per_epoch - start_step)

    def close(self) -> None:
        """Nothing runs between steps: there is nothing to stop."""
