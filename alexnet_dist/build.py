"""Building one rank's parts of a training run, in one place: its process groups, its
input feeds, its towers inside a DeepSpeed engine, the schedule, checkpoints and
metrics. :class:`~alexnet_dist.training.Trainer` runs the loop over them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet_dist.checkpoint import CheckpointError, Checkpoints
from alexnet_dist.config import Config, ConfigError, deepspeed_config, gradient_accumulation
from alexnet_dist.distributed import is_rank0, shared_from_rank0, unlink_deepspeed_shm
from alexnet_dist.groups import HybridGroups, TowerGroups, groups_for
from alexnet_dist.hybrid import HybridAlexNet
from alexnet_dist.metrics import MetricsLog, quiet_stdout, say
from alexnet_dist.model import AlexNet, memory_format_for
from alexnet_dist.schedule import LRSchedule
from data_pipeline import DataError

__all__ = ["Parts", "USER_ERRORS", "build", "prepare_images", "remaining_steps"]

# What a user can fix: each is reported as one line, without a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError)


@dataclass
class Parts:
    """What one rank trains with (:func:`build` makes it)."""

    cfg: Config
    device: torch.device
    groups: TowerGroups | HybridGroups
    num_classes: int
    classes: list[str] | None  # the training set's class names (None for generated batches)
    feed: object  # data_pipeline.TrainFeed or SyntheticFeed: ``epoch(e, start_step)``, ``close()``
    val_feed: object | None  # data_pipeline.ValFeed: ``batches()``, ``close()``
    engine: object  # deepspeed.DeepSpeedEngine around this rank's towers
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    checkpoints: Checkpoints
    metrics: MetricsLog
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    grad_accum: int  # micro batches per optimizer step (train.grad_accum, or derived from train.global_batch_size)
    global_batch: int  # images per optimizer step, over every replica


def prepare_images(cfg: Config):
    """List (and scan) the training and validation images, or read a packed set's index; the
    demo set when none is named."""
    from data_pipeline import ImageList, ensure_demo_dataset, open_images, scan_and_filter
    from data_pipeline.folder import name_some

    train_dir, val_dir = cfg.data.train_dir, cfg.data.val_dir
    cache = str(Path(cfg.data.cache_dir).expanduser())
    if train_dir is None:
        train_dir, val_dir = ensure_demo_dataset(cache)

    def listed(root, classes=None):
        images = open_images(root, classes)
        if not isinstance(images, ImageList):  # a packed set: its images were checked when it was packed
            return images
        if images.ignored:
            say(images.ignored_summary())
        if cfg.data.scan:
            images = scan_and_filter(images, policy=cfg.data.on_bad_file, cache_dir=cache, progress=True)
        return images

    train = listed(train_dir)
    if not val_dir:
        return train, None
    val = listed(val_dir, train.classes)  # labels by the training set's class names, never by position
    if val.missing_classes:
        say(f"{val_dir} has no folder for {len(val.missing_classes)} of the {len(train.classes)} training "
            f"classes ({name_some(val.missing_classes)}): validation covers the others")
    return train, val


def _feeds(cfg: Config, groups: TowerGroups | HybridGroups, device: torch.device):
    """(class names or None, training feed, validation feed or None) for this rank."""
    from data_pipeline import SyntheticFeed, TrainFeed, ValFeed, load_eigen

    t, dtype, place = cfg.train, cfg.train.torch_dtype, groups.train_input()
    if cfg.data.synthetic:
        return None, SyntheticFeed(
            micro_batch_size=t.micro_batch_size, num_classes=cfg.model.num_classes or 1000, seed=t.seed,
            replica=place["replica"], num_replicas=place["num_replicas"], device=device, dtype=dtype,
            image_size=cfg.data.image_size,
        ), None
    train_images, val_images = shared_from_rank0(lambda: prepare_images(cfg), USER_ERRORS)
    common = dict(device=device, dtype=dtype, image_size=cfg.data.image_size, resize=cfg.data.resize,
                  decode_ahead=cfg.data.decode_ahead)
    feed = TrainFeed(
        train_images, micro_batch_size=t.micro_batch_size, seed=t.seed, augment=cfg.data.augment,
        eigen=load_eigen(cfg.data.pca), num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch, **place,
        **common,
    )
    val_feed = (
        ValFeed(val_images, batch_size=t.micro_batch_size, views=10 if cfg.data.ten_crop_eval else 1,
                num_threads=cfg.data.num_threads, **groups.val_input(), **common)
        if val_images is not None else None
    )
    return train_images.classes, feed, val_feed


def _cpu_op_cached() -> bool:
    """Whether DeepSpeed's CPU communication op is already compiled in torch's extension cache."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob("**/deepspeed_shm_comm/deepspeed_shm_comm*.so"))


def _model(cfg: Config, groups: TowerGroups | HybridGroups, num_classes: int) -> AlexNet | HybridAlexNet:
    """This rank's part of the network, its parameters marked for DeepSpeed's gradient norm:
    ``model_parallel`` ones are summed over the model-parallel group, the others counted on
    its rank 0 only."""
    t, m = cfg.train, cfg.model
    if isinstance(groups, HybridGroups):
        model = HybridAlexNet(num_classes, m.width_mult, m.dropout, m.init, group=groups.hybrid_group, seed=t.seed)
        for p in model.parameters():
            p.model_parallel = True  # the classifier's shares are disjoint
        for p in model.towers.parameters():
            p.model_parallel = False  # the convolutions are the same on every rank of the group
        return model
    model = AlexNet(num_classes, m.width_mult, m.dropout, m.init, towers=groups.towers, group=groups.pair_group,
                    seed=t.seed, exchange_chunks=t.exchange_chunks)
    for p in model.parameters():
        p.model_parallel = True  # towers hold disjoint weights: clipping sums norms over the pair
    return model


def _engine(cfg: Config, groups: TowerGroups | HybridGroups, num_classes: int):
    """This rank's towers, their SGD and the DeepSpeed engine around them."""
    import deepspeed

    if groups.topology.world_size > 1 and not torch.cuda.is_available() and not _cpu_op_cached() and is_rank0():
        say("compiling DeepSpeed's CPU communication op, once (about a minute; cached under "
            "TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)")

    model = _model(cfg, groups, num_classes)
    t = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    group_size = groups.topology.size if isinstance(groups, HybridGroups) else 1
    with quiet_stdout():  # DeepSpeed prints "... built successfully" on every start
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=groups, dist_init_required=False,
                                          config=deepspeed_config(cfg, groups.topology.data_parallel_size, group_size))
    unlink_deepspeed_shm()
    return engine, optimizer


def build(cfg: Config, device: torch.device) -> Parts:
    """Every part of this rank's run; collective (every rank calls it)."""
    groups = groups_for(cfg.model.parallel, cfg.model.hybrid_size, cfg.run.collective_timeout_s)
    t = cfg.train
    classes, feed, val_feed = _feeds(cfg, groups, device)
    num_classes = cfg.model.num_classes or (len(classes) if classes else 1000)
    if classes and num_classes < len(classes):
        raise ConfigError(f"model.num_classes={num_classes} is fewer than the {len(classes)} class folders of "
                          "the training set; leave it unset to use the folders' number")
    replicas = groups.train_input()["num_replicas"]  # input replicas: a hybrid rank is one
    accum = gradient_accumulation(t, replicas)
    steps_per_epoch = feed.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{accum} micro batches per step (train.grad_accum or train.global_batch_size) do not fit in an epoch "
            f"of {feed.steps_per_epoch} per replica; lower train.grad_accum or train.micro_batch_size"
        )
    total_steps = remaining_steps(t.epochs, steps_per_epoch, t.max_steps)
    global_batch = t.micro_batch_size * accum * replicas
    engine, optimizer = _engine(cfg, groups, num_classes)
    return Parts(
        cfg=cfg, device=device, groups=groups, num_classes=num_classes, classes=classes, feed=feed,
        val_feed=val_feed, engine=engine, optimizer=optimizer,
        schedule=LRSchedule(t, total_steps, global_batch, steps_per_epoch),
        checkpoints=Checkpoints(cfg.run.dir, cfg.run.keep_last), metrics=MetricsLog(cfg.run.dir),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, grad_accum=accum, global_batch=global_batch,
    )


def remaining_steps(epochs: int, steps_per_epoch: int, max_steps: int | None, step: int = 0, epoch: int = 0,
                    in_epoch: int = 0) -> int:
    """The run's last step, counted from ``step`` (at ``in_epoch`` steps into 0-based ``epoch``):
    the end of ``epochs`` epochs or ``max_steps``, whichever comes first.

    >>> remaining_steps(10, 5, None), remaining_steps(10, 5, 20), remaining_steps(10, 4, None, step=17, epoch=3, in_epoch=2)
    (50, 20, 43)
    """
    by_epochs = step + (epochs - epoch) * steps_per_epoch - in_epoch
    return by_epochs if max_steps is None else min(by_epochs, max_steps)
