"""The training job behind ``train.py``: one tower per rank (or both in one process),
DeepSpeed data parallelism over tower pairs, DALI input, checkpoints that resume exactly.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from alexnet_dist import exchanges, faults
from alexnet_dist.checkpoint import CheckpointError, Checkpoints
from alexnet_dist.config import Config, ConfigError, deepspeed_config, load_config
from alexnet_dist.distributed import discover, init_distributed, is_rank0, unlink_deepspeed_shm
from alexnet_dist.groups import TowerGroups
from alexnet_dist.metrics import MetricsLog, Progress, say
from alexnet_dist.model import AlexNet, memory_format_for
from alexnet_dist.schedule import LRSchedule
from alexnet_dist.topology import Topology

__all__ = ["Trainer", "main", "parse_args"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UserError(Exception):
    """Raised on ranks other than 0 when rank 0 already reported the problem."""


def _data_error_type() -> type[Exception]:
    from data_pipeline import DataError

    return DataError


def _shared_from_rank0(fn):
    """Run ``fn`` on global rank 0 and hand its result (or its user error) to every rank."""
    outcome = None
    if is_rank0():
        try:
            outcome = ("ok", fn())
        except (_data_error_type(), ConfigError) as e:
            outcome = ("error", e)
    status, value = exchanges.broadcast_object(outcome)
    if status == "error":
        raise value if is_rank0() else UserError(str(value))
    return value


def prepare_images(cfg: Config):
    """List (and scan) the training and validation images; the demo set when none is named."""
    from data_pipeline import ensure_demo_dataset, list_images, scan_and_filter

    train_dir, val_dir = cfg.data.train_dir, cfg.data.val_dir
    cache = str(Path(cfg.data.cache_dir).expanduser())
    if train_dir is None:
        train_dir, val_dir = ensure_demo_dataset(cache)

    def listed(root):
        images = list_images(root)
        if images.ignored:
            say(images.ignored_summary())
        if cfg.data.scan:
            images = scan_and_filter(images, policy=cfg.data.on_bad_file, cache_dir=cache, progress=True)
        return images

    return listed(train_dir), (listed(val_dir) if val_dir else None)


class Trainer:
    """Everything one rank needs to train: its towers in a DeepSpeed engine, its feeds,
    the schedule, checkpoints and reports."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        import deepspeed

        self.cfg, self.device = cfg, device
        self.groups = g = TowerGroups.from_world(cfg.run.collective_timeout_s)
        self.topology: Topology = g.topology
        t = cfg.train
        if g.topology.tower_parallel_size > 1 and t.micro_batch_size % 2:
            raise ConfigError(f"train.micro_batch_size must be even with one tower per rank, got {t.micro_batch_size}")
        self.dtype = DTYPES[t.precision]
        self.num_classes, self.feed, self.val_feed = self._feeds()
        self.steps_per_epoch = self.feed.steps_per_epoch // t.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.grad_accum={t.grad_accum} needs {t.grad_accum} micro batches per step, but an epoch holds "
                f"{self.feed.steps_per_epoch} per replica; lower train.grad_accum or train.micro_batch_size"
            )
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.global_batch = t.micro_batch_size * t.grad_accum * g.topology.data_parallel_size

        model = AlexNet(self.num_classes, cfg.model.width_mult, cfg.model.dropout, cfg.model.init,
                        towers=g.towers, group=g.pair_group, seed=t.seed, exchange_chunks=t.exchange_chunks)
        for p in model.parameters():
            p.model_parallel = True  # towers hold disjoint weights: clipping sums norms over the pair
        self.memory_format = memory_format_for(device)  # of the input batches; parameters stay contiguous
        self.optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=deepspeed_config(cfg, g.topology.data_parallel_size),
            mpu=g, dist_init_required=False,
        )
        unlink_deepspeed_shm()
        self.schedule = LRSchedule(t, self.total_steps, self.global_batch, self.steps_per_epoch)
        self.checkpoints = Checkpoints(cfg.run.dir, cfg.run.keep_last)
        self.metrics = MetricsLog(cfg.run.dir)
        self.step = 0
        self.best_top1 = -1.0
        self.stop_requested = False

    def _feeds(self):
        """(number of classes, training feed, validation feed or None) for this rank."""
        from data_pipeline import SyntheticFeed, TrainFeed, ValFeed, load_eigen

        cfg, g, t = self.cfg, self.groups, self.cfg.train
        if cfg.data.synthetic:
            num_classes = cfg.model.num_classes or 1000
            return num_classes, SyntheticFeed(
                micro_batch_size=t.micro_batch_size, num_classes=num_classes, seed=t.seed, replica=g.replica,
                num_replicas=g.topology.data_parallel_size, device=self.device, dtype=self.dtype,
                image_size=cfg.data.image_size,
            ), None
        train_images, val_images = _shared_from_rank0(lambda: prepare_images(cfg))
        common = dict(
            replica=g.replica, num_replicas=g.topology.data_parallel_size, pair_rank=g.pair_rank,
            pair_size=g.topology.tower_parallel_size, gather=g.gather_batch, device=self.device, dtype=self.dtype,
            image_size=cfg.data.image_size, resize=cfg.data.resize,
        )
        feed = TrainFeed(
            train_images, micro_batch_size=t.micro_batch_size, seed=t.seed, augment=cfg.data.augment,
            eigen=load_eigen(cfg.data.pca), num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch, **common,
        )
        val_feed = (
            ValFeed(val_images, batch_size=t.micro_batch_size, views=10 if cfg.data.ten_crop_eval else 1,
                    num_threads=cfg.data.num_threads, **common)
            if val_images is not None else None
        )
        return cfg.model.num_classes or len(train_images.classes), feed, val_feed

    # ------------------------------------------------------------------ state

    def layout(self) -> dict:
        """What a checkpoint records about the network and the world (dropout: for export)."""
        return dict(
            num_classes=self.num_classes, width_mult=self.cfg.model.width_mult, dropout=self.cfg.model.dropout,
            tower_parallel_size=self.topology.tower_parallel_size, data_parallel_size=self.topology.data_parallel_size,
        )

    def client_state(self) -> dict:
        return dict(
            step=self.step, best_top1=self.best_top1, schedule=self.schedule.state_dict(),
            rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()),
        )

    def resume(self) -> None:
        state = self.checkpoints.load(self.engine, self.layout())
        if state is None:
            return
        self.step, self.best_top1 = state["step"], state["best_top1"]
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.metrics.truncate_after(self.step)
        if is_rank0():
            say(f"resumed from step {self.step} ({self.checkpoints.newest()})")

    def save(self, best: bool = False) -> None:
        self.checkpoints.save(self.engine, self.step, self.client_state(), self.layout(), best)

    # ------------------------------------------------------------------ loop

    def micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro batches from the current step on, across epochs."""
        accum = self.cfg.train.grad_accum
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        while True:
            yield from self.feed.epoch(epoch, start_step=in_epoch * accum)
            epoch, in_epoch = epoch + 1, 0

    def train_step(self, batches: Iterator) -> tuple[torch.Tensor, float]:
        """One optimizer step over ``grad_accum`` micro batches; (mean loss, data-wait seconds)."""
        lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.cfg.train.grad_accum
        losses, waited = [], 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - t0
            self.engine.module.reseed_dropout(self.cfg.train.seed, self.groups.replica, self.step * accum + micro)
            loss = F.cross_entropy(self.engine(x.contiguous(memory_format=self.memory_format)).float(), y)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean(), waited

    def _report(self, losses: list[torch.Tensor], first_step: int, seconds: float, waited: float, progress: Progress) -> None:
        """Average the interval's losses over replicas (one collective) and log each step."""
        dp = self.topology.data_parallel_size
        mean = exchanges.all_reduce_sum(torch.stack(losses), self.groups.data_group) / dp
        images_per_sec = len(losses) * self.global_batch / max(seconds, 1e-9)
        for i, loss in enumerate(mean.tolist()):
            step = first_step + i
            self.metrics.write(dict(
                step=step + 1, epoch=step // self.steps_per_epoch + 1, loss=loss,
                lr=self.schedule.lr(step), images_per_sec=images_per_sec,
            ))
        progress.update(first_step + len(losses) - 1, mean[-1].item(), images_per_sec, waited / max(seconds, 1e-9), len(losses))

    def fit(self) -> None:
        cfg = self.cfg
        if self.step >= self.total_steps:
            say_rank0(f"nothing to do: run.dir {cfg.run.dir} already holds step {self.step} of {self.total_steps}")
            return
        progress = Progress(self.total_steps, self.step, cfg.run.log_every)
        batches = self.micro_batches()
        # Since the last report: step losses, first step, start time, seconds spent outside
        # training (evaluation, checkpoints), seconds waiting for data.
        losses, first, start, paused, waited = [], self.step, time.perf_counter(), 0.0, 0.0
        try:
            while self.step < self.total_steps:
                loss, wait = self.train_step(batches)
                losses.append(loss)
                waited += wait
                self.step += 1
                if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                    self._report(losses, first, time.perf_counter() - start - paused, waited, progress)
                    losses, first, start, paused, waited = [], self.step, time.perf_counter(), 0.0, 0.0
                    if exchanges.any_rank(self.stop_requested, self.device):
                        progress.note(f"stop requested: checkpoint at step {self.step}, then exit")
                        self.save()
                        return
                t0 = time.perf_counter()
                if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                    self._end_epoch(progress)
                elif cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                    self.save()
                paused += time.perf_counter() - t0
        finally:
            progress.close()

    def _end_epoch(self, progress: Progress) -> None:
        epoch = math.ceil(self.step / self.steps_per_epoch)
        best = False
        if self.val_feed is not None and (epoch % self.cfg.train.eval_every_epochs == 0 or self.step == self.total_steps):
            result = self.evaluate()
            progress.note(f"epoch {epoch} val loss {result['loss']:.4f} top1 {result['top1']:.4f} top5 {result['top5']:.4f}")
            if self.schedule.end_epoch(1.0 - result["top1"]):
                progress.note(f"validation error stopped improving: lr now {self.schedule.lr(self.step):.2e}")
            best = result["top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, result["top1"])
        every = self.cfg.run.checkpoint_every
        if best or self.step == self.total_steps or (every and self.step % every == 0):
            self.save(best=best)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, top-1 and top-5 over the whole validation set, every image once."""
        model = self.engine  # its forward applies the precision (autocast for bf16)
        model.eval()
        views = 10 if self.cfg.data.ten_crop_eval else 1
        k = min(5, self.num_classes)
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, count
        for x, y in self.val_feed.batches():
            logits = model(x).float()
            probs = logits.softmax(1).view(len(y), views, -1).mean(1)  # the paper averages the views' predictions
            top = probs.topk(k, 1).indices
            totals += torch.stack([
                F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").double(),
                (top[:, 0] == y).sum().double(),
                (top == y[:, None]).any(1).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=self.device),
            ])
        model.train()
        loss, top1, top5, count = exchanges.all_reduce_sum(totals, self.groups.data_group).tolist()
        result = dict(step=self.step, split="val", loss=loss / count, top1=top1 / count, top5=top5 / count)
        self.metrics.write(result)
        return result


def say_rank0(message: str) -> None:
    if is_rank0():
        say(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the two-tower AlexNet (see train.py's docstring).")
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run(cfg: Config, device: torch.device) -> None:
    trainer = Trainer(cfg, device)
    signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
    trainer.resume()
    if cfg.run.evaluate_only:
        if trainer.val_feed is None:
            raise ConfigError("run.evaluate_only needs data.val_dir")
        if trainer.checkpoints.newest() is None:
            raise CheckpointError(f"run.evaluate_only: no complete checkpoint under {trainer.checkpoints.root}")
        result = trainer.evaluate()
        say_rank0(f"step {trainer.step}: val loss {result['loss']:.4f} top1 {result['top1']:.4f} top5 {result['top5']:.4f}")
        return
    trainer.fit()


def _write_resolved_config(cfg: Config) -> None:
    run_dir = Path(cfg.run.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir} is not writable: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = discover()
    where = f"[rank {info.rank}/{info.world_size}]"
    try:
        cfg = load_config(args.config, args.set)
        Topology(info.world_size)
        device = init_distributed(info, cfg.run.collective_timeout_s)
        faults.register_rank(cfg.run.dir)
        _shared_from_rank0(lambda: _write_resolved_config(cfg))
        _run(cfg, device)
    except UserError:
        return 2
    except (ConfigError, CheckpointError, ValueError, _data_error_type()) as e:
        say(f"error {where}: {e}", sys.stderr)
        return 2
    except Exception as e:  # a rank gone, a collective timed out, a full disk: one line; anything else re-raised
        return faults.report_failure(e, where)
    except KeyboardInterrupt:
        say(f"error {where}: interrupted", sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
