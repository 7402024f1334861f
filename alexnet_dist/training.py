"""The training loop over one rank's parts (:mod:`alexnet_dist.build`): optimizer steps
over micro batches, reports, evaluation, checkpoints and resume.

The loop's public surface is what ``train.py`` and ``bench train`` both use:
:meth:`Trainer.batches`, :meth:`Trainer.train_step`, :meth:`Trainer.fit`,
:meth:`Trainer.evaluate` and :meth:`Trainer.close`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from alexnet_dist import exchanges
from alexnet_dist.build import Parts, remaining_steps
from alexnet_dist.distributed import is_rank0
from alexnet_dist.engine_state import load_loss_scale, load_towers, read_loss_scale, read_towers
from alexnet_dist.metrics import Progress, say
from alexnet_dist.model import memory_format_for

__all__ = ["Trainer", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss stopped being a number; the message is the one line the user sees."""


class Trainer:
    """One rank's run: the step counter, the data position (epoch, steps into it), the best
    validation top-1 and ``stop`` (set by a signal handler: checkpoint at the next report and
    return) over the parts it trains with."""

    def __init__(self, parts: Parts, stop: threading.Event | None = None) -> None:
        self.parts = p = parts
        self.cfg, self.device, self.groups, self.engine = p.cfg, p.device, p.groups, p.engine
        self.num_classes, self.global_batch, self.total_steps = p.num_classes, p.global_batch, p.total_steps
        self.memory_format = memory_format_for(p.device)  # of the input batches; parameters stay contiguous
        self.step = 0
        self.epoch, self.in_epoch = 0, 0  # 0-based epoch, optimizer steps done in it
        self.best_top1 = -1.0
        self.stop = stop or threading.Event()

    # ------------------------------------------------------------------ state

    def network(self) -> dict:
        """What a checkpoint records about the network (the keys that must match on resume,
        then what export needs: dropout, the class names, the preprocessing)."""
        from data_pipeline.feeds import IMAGENET_MEAN, IMAGENET_STD

        data = self.cfg.data
        return dict(
            num_classes=self.num_classes, width_mult=self.cfg.model.width_mult, dropout=self.cfg.model.dropout,
            classes=self.parts.classes,
            preprocess=dict(resize=data.resize, crop=data.image_size, mean=(IMAGENET_MEAN / 255).tolist(),
                            std=(IMAGENET_STD / 255).tolist()),
        )

    def layout(self) -> dict:
        """The world a checkpoint was written in: reported when a resume runs in another."""
        topology, t = self.groups.topology, self.cfg.train
        return dict(world_size=topology.world_size, data_parallel_size=topology.data_parallel_size,
                    global_batch=self.global_batch, zero_stage=t.zero_stage, precision=t.precision,
                    parallel=self.cfg.model.parallel if topology.world_size > 1 else "towers")

    def _state(self) -> dict:
        """The loop's state, in tensors and plain values only, so the checkpoint's files
        read back with ``torch.load(weights_only=True)`` (no pickled code runs)."""
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return dict(
            step=self.step, best_top1=self.best_top1, schedule=self.parts.schedule.state_dict(),
            data=dict(epoch=self.epoch, samples=self.in_epoch * self.global_batch,
                      num_samples=self.parts.feed.num_samples),
            loss_scale=read_loss_scale(self.engine),
            rng=dict(torch=torch.get_rng_state(), numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                         has_gauss, gauss), python=random.getstate()),
        )

    def resume(self) -> None:
        """Continue from the newest complete checkpoint of ``run.dir``, if there is one, whatever
        layout wrote it (a different one is said in one line)."""
        loaded = self.parts.checkpoints.load(self.network(), self.groups.towers, self.device)
        if loaded is None:
            return
        load_towers(self.engine, loaded.towers)
        state = loaded.state
        load_loss_scale(self.engine, state["loss_scale"])
        self.step, self.best_top1 = state["step"], state["best_top1"]
        self.parts.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        name, keys, *rest = state["rng"]["numpy"]
        np.random.set_state((name, np.asarray(keys.cpu(), dtype=np.uint32), *rest))
        random.setstate(state["rng"]["python"])
        repeated = self._seek(state["data"])
        self.engine.global_steps, self.engine.global_samples = self.step, self.step * self.global_batch
        self.engine.micro_steps = self.step * self.parts.grad_accum
        self.parts.metrics.truncate_after(self.step)
        if is_rank0():
            say(f"resumed from step {self.step} ({loaded.path})")
            if changed := self._layout_change(loaded.meta, state["data"], repeated):
                say(changed)

    def _seek(self, data: dict) -> int:
        """Take the data position of a checkpoint: its epoch, and as many of this layout's steps
        as its images into that epoch cover; the images it had seen past them (when the global
        batch changed) are seen again: their count."""
        self.epoch = data["epoch"]
        self.in_epoch, repeated = divmod(data["samples"], self.global_batch)
        self.total_steps = remaining_steps(self.cfg.train.epochs, self.parts.steps_per_epoch, self.cfg.train.max_steps,
                                           self.step, self.epoch, self.in_epoch)
        self.parts.schedule.total_steps = max(1, self.total_steps)
        return repeated

    def _layout_change(self, was: dict, data: dict, repeated: int) -> str:
        """One line on what differs between the checkpoint's layout (``was``, its meta) and this
        run's, or ""."""
        now = self.layout()
        was = {"parallel": "towers", **was}  # checkpoints from before the hybrid layout
        ranks = lambda n: "1 process" if n == 1 else f"{n} ranks"  # noqa: E731
        changes = []
        if was.get("data_parallel_size") != now["data_parallel_size"]:
            replicas = now["data_parallel_size"]
            changes.append(f"{replicas} replica{'s' if replicas > 1 else ''} instead of {was.get('data_parallel_size')}")
        if was.get("global_batch") != now["global_batch"]:
            changes.append(f"{now['global_batch']} images per step instead of {was.get('global_batch')} (set "
                           f"train.global_batch_size to keep it){f', {repeated} images seen again' if repeated else ''}")
        for key, what in (("zero_stage", "ZeRO stage"), ("precision", "precision"), ("parallel", "model.parallel")):
            if was.get(key) != now[key]:
                changes.append(f"{what} {now[key]} instead of {was.get(key)}")
        if data["num_samples"] != self.parts.feed.num_samples:
            changes.append(f"{self.parts.feed.num_samples} training images instead of {data['num_samples']}, so "
                           "another sample order from here on")
        if not changes and was.get("world_size") == now["world_size"]:
            return ""
        return (f"resuming a checkpoint of {ranks(was.get('world_size', 0))} on {ranks(now['world_size'])}"
                + (f": {'; '.join(changes)}" if changes else ""))

    def save(self, best: bool = False) -> None:
        """A checkpoint of this step: every rank reads its towers out of the engine (collective
        under ZeRO, and over a hybrid group), the ranks of replica 0 write them (in the hybrid
        layout rank 0 alone)."""
        towers = read_towers(self.engine, self.parts.optimizer)
        mine = towers if self.groups.writes_towers else {}
        self.parts.checkpoints.save(self.step, mine, self._state(), {**self.network(), **self.layout()}, best)

    def close(self) -> None:
        """Stop the input pipelines (DALI's threads and buffers); batches already taken still train."""
        for feed in (self.parts.feed, self.parts.val_feed):
            if feed is not None:
                feed.close()

    # ------------------------------------------------------------------ loop

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro batches from the current data position on, across epochs. An epoch is whole
        optimizer steps: the feed's last micro batches that do not fill one are left out, as
        its last images that do not fill a micro batch are (otherwise the next epoch would
        start with them, and a run resumed there would not)."""
        accum, per_epoch = self.parts.grad_accum, self.parts.steps_per_epoch
        epoch, start = self.epoch, self.in_epoch * accum
        while True:
            yield from itertools.islice(self.parts.feed.epoch(epoch, start_step=start), per_epoch * accum - start)
            epoch, start = epoch + 1, 0

    def train_step(self, batches: Iterator) -> tuple[torch.Tensor, float]:
        """One optimizer step over ``grad_accum`` micro batches, then ``step`` and the data
        position count it; (mean loss, seconds spent waiting for data)."""
        lr = self.parts.schedule.lr(self.step)
        for group in self.parts.optimizer.param_groups:
            group["lr"] = lr
        accum = self.parts.grad_accum
        losses, waited = [], 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - t0
            self.engine.module.reseed_dropout(self.cfg.train.seed, self.groups.replica, self.step * accum + micro)
            logits = self.engine(x.contiguous(memory_format=self.memory_format)).float()
            loss = F.cross_entropy(logits, self.groups.targets(y))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        self.step += 1
        self.in_epoch += 1
        if self.in_epoch == self.parts.steps_per_epoch:
            self.epoch, self.in_epoch = self.epoch + 1, 0
        return torch.stack(losses).mean(), waited

    def _report(self, interval: _Interval, progress: Progress) -> None:
        """Average the interval's losses over replicas (one collective) and log each step."""
        dp = self.groups.topology.data_parallel_size
        mean = exchanges.all_reduce_sum(torch.stack(interval.losses), self.groups.data_group) / dp
        seconds = interval.seconds()
        images_per_sec = len(interval.losses) * self.global_batch / max(seconds, 1e-9)
        values = mean.tolist()
        self._check_finite(values, interval.first)
        for i, (loss, epoch) in enumerate(zip(values, interval.epochs)):
            step = interval.first + i
            self.parts.metrics.write(dict(step=step + 1, epoch=epoch, loss=loss, lr=self.parts.schedule.lr(step),
                                          images_per_sec=images_per_sec))
        progress.update(self.step - 1, mean[-1].item(), images_per_sec, interval.waited / max(seconds, 1e-9),
                        len(values))

    def _check_finite(self, losses: list[float], first_step: int) -> None:
        """Stop at the first loss that is not a number (same on every rank: it is all-reduced),
        before it is written, evaluated or saved."""
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if bad is None:
            return
        step = first_step + bad
        kept = self.parts.checkpoints.newest()
        raise TrainingDiverged(
            f"the loss is {losses[bad]} at step {step + 1} (lr {self.parts.schedule.lr(step):.3g}): training diverged "
            f"and stops; {f'the checkpoint {kept.name} is the last one kept' if kept else 'no checkpoint was kept'}. "
            "Lower train.lr, or set train.warmup_steps or train.grad_clip")

    def fit(self) -> None:
        """Train from the current step to ``total_steps`` (or a requested stop, after a checkpoint)."""
        cfg = self.cfg
        if self.step >= self.total_steps:
            if is_rank0():
                say(f"nothing to do: run.dir {cfg.run.dir} already holds step {self.step} of {self.total_steps}")
            return
        progress = Progress(self.total_steps, self.step, cfg.run.log_every)
        batches = self.batches()
        interval = _Interval(self.step)
        try:
            while self.step < self.total_steps:
                epoch = self.epoch + 1  # 1-based, of the step about to run
                loss, wait = self.train_step(batches)
                interval.add(loss, epoch, wait)
                epoch_ends = self.in_epoch == 0 or self.step == self.total_steps
                checkpoint = bool(cfg.run.checkpoint_every) and self.step % cfg.run.checkpoint_every == 0
                # A report checks the losses, so one comes before anything is evaluated or saved.
                if self.step % cfg.run.log_every == 0 or epoch_ends or checkpoint:
                    self._report(interval, progress)
                    interval = _Interval(self.step)
                    if exchanges.any_rank(self.stop.is_set(), self.device):
                        progress.note(f"stop requested: checkpoint at step {self.step}, then exit")
                        self.save()
                        return
                with interval.paused():
                    if epoch_ends:
                        self._end_epoch(epoch, progress)
                    elif checkpoint:
                        self.save()
        finally:
            progress.close()

    def _end_epoch(self, epoch: int, progress: Progress) -> None:
        schedule, best = self.parts.schedule, False
        if self.parts.val_feed is not None and (
                epoch % self.cfg.train.eval_every_epochs == 0 or self.step == self.total_steps):
            result = self.evaluate()
            progress.note(f"epoch {epoch} val loss {result['loss']:.4f} top1 {result['top1']:.4f} "
                          f"top5 {result['top5']:.4f}")
            if schedule.end_epoch(1.0 - result["top1"]):
                progress.note(f"validation error stopped improving: lr now {schedule.lr(self.step):.2e}")
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
        for x, y in self.parts.val_feed.batches():
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
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the validation loss is {loss} at step {self.step}: the network's outputs are "
                                   "not numbers; the run stops without saving")
        result = dict(step=self.step, split="val", loss=loss / count, top1=top1 / count, top5=top5 / count)
        self.parts.metrics.write(result)
        return result


@dataclass
class _Interval:
    """The steps since the last report: their losses and epochs, the first one's index, when
    it started, and the seconds spent outside training (evaluation, checkpoints) and waiting
    for data."""

    first: int
    losses: list[torch.Tensor] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    outside: float = 0.0
    waited: float = 0.0

    def add(self, loss: torch.Tensor, epoch: int, waited: float) -> None:
        self.losses.append(loss)
        self.epochs.append(epoch)
        self.waited += waited

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.outside += time.perf_counter() - t0

    def seconds(self) -> float:
        """Training seconds since the interval started."""
        return time.perf_counter() - self.start - self.outside
