"""Learning-rate schedules: the paper's (divide by 10 when validation error stops
improving), step, cosine and constant, each after an optional linear warm-up.

>>> from alexnet_dist.config import TrainConfig
>>> s = LRSchedule(TrainConfig(lr=0.1, schedule="cosine", warmup_steps=10), total_steps=110, global_batch=128)
>>> round(s.lr(0), 4), round(s.lr(9), 4), round(s.lr(10), 4), round(s.lr(110), 4)
(0.01, 0.1, 0.1, 0.0)
>>> p = LRSchedule(TrainConfig(lr=0.01, plateau_patience=1), total_steps=100, global_batch=128)
>>> [p.end_epoch(err) for err in (0.5, 0.4, 0.45, 0.39)]
[False, False, True, False]
>>> p.lr(50)
0.001
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from alexnet_dist.config import TrainConfig

__all__ = ["LRSchedule"]


@dataclass
class _PlateauState:
    best_error: float = math.inf
    bad_epochs: int = 0
    drops: int = 0


class LRSchedule:
    """``lr(step)`` for optimizer step ``step``; ``end_epoch(val_error)`` feeds the plateau rule."""

    def __init__(self, cfg: TrainConfig, total_steps: int, global_batch: int, steps_per_epoch: int = 1) -> None:
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
        scale = global_batch / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0
        self.base_lr = cfg.lr * scale
        self.plateau = _PlateauState()

    def lr(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if step < warm:
            return self.base_lr * (step + 1) / warm
        kind = self.cfg.schedule
        if kind == "cosine":
            progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "step":
            epoch = step // self.steps_per_epoch
            return self.base_lr * 0.1 ** sum(epoch >= e for e in self.cfg.step_epochs)
        if kind == "plateau":
            return self.base_lr * 0.1**self.plateau.drops
        return self.base_lr

    def end_epoch(self, val_error: float) -> bool:
        """Record an epoch's validation error; True when the plateau rule drops the lr."""
        p = self.plateau
        if val_error < p.best_error:
            p.best_error, p.bad_epochs = val_error, 0
            return False
        p.bad_epochs += 1
        if self.cfg.schedule == "plateau" and p.bad_epochs >= self.cfg.plateau_patience and p.drops < self.cfg.max_lr_drops:
            p.drops, p.bad_epochs = p.drops + 1, 0
            return True
        return False

    def state_dict(self) -> dict:
        return asdict(self.plateau)

    def load_state_dict(self, state: dict) -> None:
        self.plateau = _PlateauState(**state)
