"""What a run reports: ``metrics.jsonl`` (its format: docs/ARCHITECTURE.md) and the
progress display.

Writing is global rank 0's alone; other ranks get inert objects. :func:`read_records`
is the one reader of the file, for the trainer's resume and for the pictures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from alexnet_dist.distributed import VERBOSE, is_rank0
from data_pipeline.fsutil import write_atomically

__all__ = ["MetricsLog", "Progress", "quiet_stdout", "read_records", "say"]


def say(message: str, stream: TextIO | None = None) -> None:
    """Print one line with a single write (lines of ranks sharing a terminal don't interleave);
    to standard output unless ``stream`` says otherwise."""
    stream = stream or sys.stdout  # looked up at the call: the stream may have been replaced
    stream.write(message + "\n")
    stream.flush()


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """What Python code prints to stdout inside, discarded (unless :data:`VERBOSE` is set)."""
    if os.environ.get(VERBOSE):
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _split_lines(text: str) -> tuple[list[tuple[int, str]], str]:
    """((line number, text) of every non-blank line that ends with its newline, what follows
    the last newline): that rest is being written by a live run, or was cut off by a full disk."""
    *complete, rest = text.split("\n")
    return [(number, line) for number, line in enumerate(complete, 1) if line.strip()], rest


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every complete line of a ``metrics.jsonl``, in order;
    ValueError naming ``path:line`` for a complete line that is not a JSON object."""
    records = []
    for number, line in _split_lines(path.read_text())[0]:
        record = _record(line)
        if record is None:
            raise ValueError(f"{path}:{number}: not JSON (one object per line): {line[:80]!r}")
        records.append((number, record))
    return records


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` on rank 0."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = is_rank0()

    def truncate_after(self, step: int) -> None:
        """Keep the records up to ``step`` (the checkpoint a resumed run starts from) and
        nothing damaged: a cut-off last line or a line that is not JSON is dropped, and said."""
        if not self.enabled or not self.path.exists():
            return
        text = self.path.read_text()
        lines, rest = _split_lines(text)
        kept, damaged = [], []
        for number, line in lines:
            record = _record(line)
            if record is None or not isinstance(record.get("step"), int):
                damaged.append(number)
            elif record["step"] <= step:
                kept.append(line)
        if rest.strip():
            damaged.append(text.count("\n") + 1)
        if damaged:
            say(f"{self.path}: dropped {len(damaged)} damaged line(s) (line {', '.join(map(str, damaged[:5]))}); "
                "the records up to the checkpoint are kept")
        write_atomically(str(self.path), "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``; a full disk is named with this file."""
        if not self.enabled:
            return
        line = json.dumps(record, allow_nan=False) + "\n"  # NaN is not JSON: the trainer stops before it
        try:
            with self.path.open("a") as f:
                f.write(line)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e


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
