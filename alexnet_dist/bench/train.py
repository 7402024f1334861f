"""``bench train``: end to end -- JPEGs through DALI, the pair's batch gather, the
exchanges and the DeepSpeed step -- beside the same training step fed from memory.

Three variants, alternated over rounds:

* ``end_to_end``: the trainer's step on the DALI feed, as ``train.py`` runs it;
* ``model_only``: the same trainer step (DeepSpeed engine included) on one real batch
  held in memory, so ``end_to_end / model_only`` is what the input costs;
* ``plain_loop``: ``bench model``'s loop of the same network without DeepSpeed
  (forward, backward, ``torch.optim.SGD``), so ``model_only / plain_loop`` is what
  DeepSpeed's engine costs.

Each rank also counts its process's CPU seconds per step (DALI's threads included):
the input's share of the CPU is ``1 - model_only / end_to_end`` of those; and the CPU
its training thread spends taking each micro batch (``input_thread_cpu_ms_per_step``:
whatever of the read, decode, gather and normalisation runs there; ``data.decode_ahead``
moves the read and decode to a worker thread), which other load on the machine barely moves.

Where DALI does not import (a GPU machine without its wheel), ``model_only`` runs on a
``data.synthetic`` batch and ``plain_loop`` beside it; ``images_per_sec`` is then 0 and
``dali_missing`` says why.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alexnet_dist.bench.model import project_variant, run_variant
from alexnet_dist.bench.timing import (bench_device, median_round, on_ranks, round_ratios, summarise, time_steps,
                                       write_rank_result)
from alexnet_dist.config import Config
from alexnet_dist.exchanges import EXCHANGE_COUNTER
from alexnet_dist.metrics import say

__all__ = ["bench_train"]


def _train_worker(rank: int, world: int, cfg: Config, steps: int, warmup: int, in_memory: bool, out: Path) -> None:
    from alexnet_dist.build import build
    from alexnet_dist.training import Trainer

    device = bench_device()
    trainer = Trainer(build(cfg, device))
    batches = trainer.batches()
    if in_memory:
        batches = itertools.repeat(next(batches))  # one real batch, again and again
        trainer.close()  # DALI's threads stop
    batches = _ThreadCPU(batches)
    waits: list[float] = []
    cpu_start = 0.0

    def step() -> None:
        _, waited = trainer.train_step(batches)
        waits.append(waited)

    def reset() -> None:
        nonlocal cpu_start
        waits.clear()
        batches.seconds = 0.0
        EXCHANGE_COUNTER.reset()
        cpu_start = time.process_time()  # every thread of this rank, DALI's included

    times = time_steps(step, steps, warmup, device, after_warmup=reset)
    cpu = time.process_time() - cpu_start
    images = cfg.train.micro_batch_size * trainer.parts.grad_accum * steps
    model_bytes = sum(v for k, v in EXCHANGE_COUNTER.bytes_sent.items() if k != "input")
    result = dict(
        summarise(times, trainer.global_batch),
        data_wait_share=sum(waits) / sum(times),
        cpu_seconds_per_step=cpu / steps,
        input_thread_cpu_ms_per_step=1e3 * batches.seconds / steps,
        exchange_wait_share=sum(v for k, v in EXCHANGE_COUNTER.seconds_waiting.items() if k != "input") / sum(times),
        exchange_bytes_per_image=model_bytes / images,
        input_gather_bytes_per_image=EXCHANGE_COUNTER.bytes_sent.get("input", 0) / images,
        num_classes=trainer.num_classes,
    )
    write_rank_result(rank, out, result)


class _ThreadCPU:
    """``batches``, counting the CPU seconds the calling thread spends in each ``next``."""

    def __init__(self, batches: Iterator) -> None:
        self.batches, self.seconds = batches, 0.0

    def __iter__(self) -> _ThreadCPU:
        return self

    def __next__(self):
        start = time.thread_time()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.thread_time() - start


def _trainer_run(cfg: Config, ranks: int, steps: int, warmup: int, in_memory: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.dir = str(Path(tmp) / "run")
        cfg.train.max_steps = None
        merged, per_rank = on_ranks(ranks, _train_worker, cfg, steps, warmup, in_memory)
    return dict(merged, cpu_seconds_per_step=sum(r["cpu_seconds_per_step"] for r in per_rank))  # all ranks


def bench_train(cfg: Config, ranks: int, steps: int, warmup: int, rounds: int = 1) -> dict[str, Any]:
    """The variants alternated over ``rounds``; each one's median round is reported."""
    from data_pipeline.feeds import dali_missing

    missing = dali_missing()
    in_memory_cfg = copy.deepcopy(cfg)
    in_memory_cfg.data.synthetic = bool(missing)  # without DALI, a generated batch stands in for a real one
    runs: dict[str, list[dict]] = {"end_to_end": [], "model_only": [], "plain_loop": []}
    for _ in range(rounds):
        if not missing:
            runs["end_to_end"].append(_trainer_run(cfg, ranks, steps, warmup, in_memory=False))
        runs["model_only"].append(_trainer_run(in_memory_cfg, ranks, steps, warmup, in_memory=True))
        num_classes = runs["model_only"][-1]["num_classes"]
        runs["plain_loop"].append(run_variant(project_variant(ranks), ranks, cfg, num_classes, steps, warmup))
    variants = {name: median_round(r) for name, r in runs.items() if r}
    result: dict[str, Any] = dict(
        what="train", world_size=ranks, model_only_images_per_sec=variants["model_only"]["images_per_sec"],
        model_only_vs_plain_loop=statistics.median(round_ratios(runs["model_only"], runs["plain_loop"])),
        variants=variants,
    )
    if missing:
        say(f"warning: {missing}; measured the training step on a generated batch only")
        return dict(result, images_per_sec=0.0, dali_missing=missing,
                    exchange_bytes_per_image=variants["model_only"]["exchange_bytes_per_image"])
    ratios = round_ratios(runs["end_to_end"], runs["model_only"])
    input_cpu = [1 - m["cpu_seconds_per_step"] / e["cpu_seconds_per_step"]
                 for e, m in zip(runs["end_to_end"], runs["model_only"])]
    return dict(
        result, images_per_sec=variants["end_to_end"]["images_per_sec"],
        exchange_bytes_per_image=variants["end_to_end"]["exchange_bytes_per_image"],
        end_to_end_vs_model_only=statistics.median(ratios), ratios_per_round=ratios,
        input_cpu_share=statistics.median(input_cpu),
    )
