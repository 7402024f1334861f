"""Step timing, peak memory and the per-rank results, shared by every benchmark mode."""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alexnet_dist.distributed import spawn_ranks

__all__ = ["bench_device", "median_round", "on_ranks", "peak_memory_mb", "round_ratios", "summarise", "time_steps",
           "write_rank_result"]


def bench_device() -> torch.device:
    """This rank's GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device,
               after_warmup: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones.

    On a GPU the steps are timed by CUDA events between them, with no host sync in
    between: the host queues step k+1 while the GPU runs step k, as in training, and
    a step's time is the GPU's time between the two events (launch gaps included).
    """
    for _ in range(warmup):
        step()
    _sync(device)
    after_warmup()
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for mark in marks[1:]:
            step()
            mark.record()
        _sync(device)
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
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


def round_ratios(tops: list[dict], bottoms: list[dict]) -> list[float]:
    """Images/s of one variant over another's, round by round (each ratio within one round)."""
    return [a["images_per_sec"] / b["images_per_sec"] for a, b in zip(tops, bottoms, strict=True)]


def median_round(rounds: list[dict]) -> dict:
    """Of one variant's rounds, the one with the median images/s (its figures stay together)."""
    return sorted(rounds, key=lambda r: r["images_per_sec"])[len(rounds) // 2]


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (GPU) or peak resident memory of this process (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_rank_result(rank: int, out: Path, result: dict[str, Any]) -> None:
    """A worker's figures, with its peak memory, for :func:`on_ranks` to merge."""
    result = dict(result, peak_memory_mb=peak_memory_mb(bench_device()))
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def on_ranks(ranks: int, worker: Callable, *args) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``worker(rank, world, *args, out)`` on ``ranks`` fresh processes, each ending
    with :func:`write_rank_result`; (rank 0's figures with every rank's peak memory as
    ``peak_memory_mb_per_rank``, every rank's figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(ranks, worker, *args, Path(tmp))
        per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]
    merged = dict(per_rank[0], world_size=ranks, peak_memory_mb_per_rank=[r["peak_memory_mb"] for r in per_rank])
    del merged["peak_memory_mb"]
    return merged, per_rank
