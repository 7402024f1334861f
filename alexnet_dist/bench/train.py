"""``bench train``: end to end -- JPEGs through DALI, the pair's batch gather, the
exchanges and the DeepSpeed step -- beside the model-only rate of the same config."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from alexnet_dist.bench.model import project_variant, run_variant
from alexnet_dist.bench.timing import bench_device, median_round, peak_memory_mb, summarise, time_steps
from alexnet_dist.config import Config
from alexnet_dist.distributed import spawn_ranks
from alexnet_dist.exchanges import EXCHANGE_COUNTER

__all__ = ["bench_train"]


def _train_worker(rank: int, world: int, cfg: Config, steps: int, warmup: int, out: Path) -> None:
    from alexnet_dist.training import Trainer

    device = bench_device()
    trainer = Trainer(cfg, device)
    batches = trainer.micro_batches()
    waits: list[float] = []

    def step() -> None:
        _, waited = trainer.train_step(batches)
        waits.append(waited)
        trainer.step += 1

    def reset() -> None:
        waits.clear()
        EXCHANGE_COUNTER.reset()

    times = time_steps(step, steps, warmup, device, after_warmup=reset)
    images = cfg.train.micro_batch_size * cfg.train.grad_accum * steps
    model_bytes = sum(v for k, v in EXCHANGE_COUNTER.bytes_sent.items() if k != "input")
    result = dict(
        summarise(times, trainer.global_batch),
        data_wait_share=sum(waits) / sum(times),
        exchange_wait_share=sum(v for k, v in EXCHANGE_COUNTER.seconds_waiting.items() if k != "input") / sum(times),
        exchange_bytes_per_image=model_bytes / images,
        input_gather_bytes_per_image=EXCHANGE_COUNTER.bytes_sent.get("input", 0) / images,
        peak_memory_mb=peak_memory_mb(device),
        num_classes=trainer.num_classes,
    )
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _end_to_end(cfg: Config, ranks: int, steps: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.dir = str(Path(tmp) / "run")
        cfg.train.max_steps = None
        spawn_ranks(ranks, _train_worker, cfg, steps, warmup, Path(tmp))
        per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]
    ours = dict(per_rank[0], peak_memory_mb_per_rank=[r["peak_memory_mb"] for r in per_rank])
    del ours["peak_memory_mb"]
    return ours


def bench_train(cfg: Config, ranks: int, steps: int, warmup: int, rounds: int = 1) -> dict[str, Any]:
    """End to end and the model-only rate of the same network (synthetic input),
    alternated over ``rounds``; each variant's median round is reported."""
    runs: dict[str, list[dict]] = {"end_to_end": [], "model_only": []}
    for _ in range(rounds):
        runs["end_to_end"].append(_end_to_end(cfg, ranks, steps, warmup))
        num_classes = runs["end_to_end"][-1].pop("num_classes")  # the same network, on synthetic input
        runs["model_only"].append(run_variant(project_variant(ranks), ranks, cfg, num_classes, steps, warmup))
    ours, model_only = median_round(runs["end_to_end"]), median_round(runs["model_only"])
    ratios = [e["images_per_sec"] / m["images_per_sec"] for e, m in zip(*runs.values())]
    return dict(
        what="train", images_per_sec=ours["images_per_sec"], world_size=ranks,
        exchange_bytes_per_image=ours["exchange_bytes_per_image"],
        model_only_images_per_sec=model_only["images_per_sec"],
        end_to_end_vs_model_only=statistics.median(ratios),  # each ratio within one round
        ratios_per_round=ratios,
        variants={"end_to_end": ours, "model_only": model_only},
    )
