"""What a run reports: ``metrics.jsonl`` (CONTRACT.md) and the progress display.

Both are global rank 0's alone; other ranks get inert objects.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from alexnet_dist.distributed import is_rank0

__all__ = ["MetricsLog", "Progress", "say"]


def say(message: str, stream: TextIO = sys.stdout) -> None:
    """Print one line with a single write (lines of ranks sharing a terminal don't interleave)."""
    stream.write(message + "\n")
    stream.flush()


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` on rank 0."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = is_rank0()

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Progress:
    """A progress bar on a terminal, plain log lines elsewhere (rank 0 only)."""

    def __init__(self, total_steps: int, start_step: int, log_every: int) -> None:
        self.enabled = is_rank0()
        self.total = total_steps
        self.log_every = log_every
        self.started = time.perf_counter()
        self.start_step = start_step
        self.bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if self.enabled and sys.stdout.isatty()
            else None
        )

    def update(self, step: int, loss: float, images_per_sec: float, data_share: float, steps_done: int) -> None:
        """Report progress after ``step`` (``steps_done`` steps since the last call)."""
        if not self.enabled:
            return
        fields = dict(loss=f"{loss:.4f}", img_s=f"{images_per_sec:.1f}", data=f"{100 * data_share:.0f}%")
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix(fields, refresh=False)
            return
        elapsed = time.perf_counter() - self.started
        rate = (step + 1 - self.start_step) / max(elapsed, 1e-9)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        say(
            f"step {step + 1}/{self.total} loss {loss:.4f} images/s {images_per_sec:.1f} "
            f"data-wait {100 * data_share:.0f}% eta {eta / 60:.1f} min"
        )

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            say(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
