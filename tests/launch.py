"""Start train.py the ways users do (python, deepspeed, torchrun, mpirun) and read its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from alexnet_dist.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A network and input small enough for a 2-core CPU; exact and deterministic.
SMALL = [
    "model.width_mult=0.125", "data.image_size=64", "data.resize=72", "train.micro_batch_size=8",
    "train.schedule=constant", "train.lr=0.01", "run.log_every=1", "data.num_threads=1",
]
EXACT = ["data.augment=false", "model.dropout=0"]


def command(launcher: str, ranks: int, args: list[str]) -> list[str]:
    train = [str(REPO / "train.py"), *args]
    if launcher == "python":
        return [sys.executable, *train]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *train]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--master-port", str(free_port()), *train]
    if launcher == "mpirun":
        return [str(BIN / "mpirun"), "-n", str(ranks), sys.executable, *train]
    raise ValueError(launcher)


def train(launcher: str, ranks: int, run_dir: Path, *sets: str, cache: Path, timeout: float = 300,
          config: str | None = None) -> subprocess.CompletedProcess:
    """Run train.py to completion; the result has ``returncode``, ``stdout`` and ``stderr``."""
    args = ["--config", config] if config else []
    for s in [*SMALL, f"run.dir={run_dir}", f"data.cache_dir={cache}", *sets]:
        args += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command(launcher, ranks, args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def records(run_dir: Path, split: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir)]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result
