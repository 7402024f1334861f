"""Step timing and peak memory, shared by every benchmark mode."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["bench_device", "peak_memory_mb", "summarise", "time_steps"]


def bench_device() -> torch.device:
    """This rank's GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device,
               after_warmup: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    after_warmup()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)  # a step's time includes its queued GPU work
        times.append(time.perf_counter() - t0)
    return times


def summarise(times: list[float], images_per_step: int) -> dict[str, float]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return dict(
        images_per_sec=images_per_step * len(times) / sum(times),
        median_step_s=statistics.median(times),
        p95_step_s=p95,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (GPU) or peak resident memory of this process (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
