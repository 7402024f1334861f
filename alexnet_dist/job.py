"""One process of the training job behind ``train.py``: find the rank, start
torch.distributed, build the parts, train, and turn every way of failing into an exit
status with one line.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import yaml

from alexnet_dist import faults
from alexnet_dist.build import USER_ERRORS, build
from alexnet_dist.checkpoint import CheckpointError
from alexnet_dist.config import Config, ConfigError, load_config
from alexnet_dist.distributed import (PortInUse, ReportedOnRank0, discover, init_distributed, is_rank0,
                                      quiet_libraries, shared_from_rank0)
from alexnet_dist.metrics import say
from alexnet_dist.topology import topology_for
from alexnet_dist.training import Trainer, TrainingDiverged
from data_pipeline.fsutil import write_atomically

__all__ = ["main", "parse_args"]


_EPILOG = """\
launch it as:
  deepspeed --num_gpus 2 train.py          one tower per GPU (or CPU process) on this machine
  python train.py                          both towers in one process (the reference)
  deepspeed --hostfile hostfile train.py   a cluster; also torchrun, mpirun -n N, sbatch launch/slurm.sbatch

every config key with its default and meaning: README.md's configuration reference,
or `python -m alexnet_dist.config`. Outputs go to run.dir (default runs/default);
starting again with the same run.dir resumes from its newest complete checkpoint.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description="Train the two-tower AlexNet (Krizhevsky et al. 2012).",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value parsed as YAML, e.g. --set train.max_steps=20 "
                             "(repeatable; default: none)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class RunDirLock:
    """Global rank 0's exclusive lock on ``run.dir/lock`` for the job's life: a second job on
    the same run.dir is refused instead of writing every line and checkpoint twice. The
    kernel drops the lock of a process that dies, so a dead job never blocks the next."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        self._file = None  # held open: closing it would release the lock

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            f = open(self.run_dir / "lock", "a+")
        except OSError as e:
            raise ConfigError(f"run.dir {self.run_dir} is not writable: {e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a job"
            f.close()
            raise ConfigError(f"run.dir {self.run_dir} is in use by another job ({holder}): wait for it to end, "
                              "or give this job another run.dir") from None
        except OSError:
            pass  # a file system without locks: nothing to hold
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f


def _stop_on_signals() -> threading.Event:
    """The event SIGTERM (a scheduler's preemption, a time limit near) and Ctrl-C set: every
    rank checkpoints and exits at the next report. Set from the start, so a signal during
    start-up still lets the ranks train a few steps and save them (a requeued SLURM job then
    makes progress in every allocation). A second Ctrl-C stops at once."""
    requested = threading.Event()

    def stop(signum, frame) -> None:
        if signum == signal.SIGINT and requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    return requested


def _run(cfg: Config, device: torch.device, stop: threading.Event) -> None:
    trainer = Trainer(build(cfg, device), stop)
    try:
        _drive(cfg, trainer)
    finally:
        trainer.close()  # the feeds' workers stop, whether the run ended or failed


def _drive(cfg: Config, trainer: Trainer) -> None:
    trainer.resume()
    shared_from_rank0(lambda: _write_resolved_config(cfg), USER_ERRORS)  # only once the resume was accepted
    if cfg.run.evaluate_only:
        if trainer.parts.val_feed is None:
            raise ConfigError("run.evaluate_only needs data.val_dir")
        if trainer.parts.checkpoints.newest() is None:
            raise CheckpointError(f"run.evaluate_only: no complete checkpoint under {trainer.parts.checkpoints.root}")
        result = trainer.evaluate()
        if is_rank0():
            say(f"step {trainer.step}: val loss {result['loss']:.4f} top1 {result['top1']:.4f} "
                f"top5 {result['top5']:.4f}")
        return
    trainer.fit()
    if is_rank0():
        say(_outcome(cfg, trainer.step, trainer.total_steps))


def _outcome(cfg: Config, step: int, total: int) -> str:
    """The run's last line: where its outputs are and what to do with them."""
    run = cfg.run.dir
    if step < total:
        return f"stopped at step {step} of {total}; start the job again with run.dir={run} to resume"
    return (f"done: {total} steps; metrics in {run}/metrics.jsonl, checkpoints in {run}/checkpoints. "
            f"Draw them: python -m alexnet_dist.viz {run}; export the network: "
            f"python -m alexnet_dist.export {run} net.pt")


def _write_resolved_config(cfg: Config) -> None:
    run_dir = Path(cfg.run.dir)
    try:
        write_atomically(str(run_dir / "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir} is not writable: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = _stop_on_signals()
    quiet_libraries()
    info = discover()
    where = f"[rank {info.rank}/{info.world_size}]"
    context = None
    try:
        cfg = load_config(args.config, args.set)
        topology_for(cfg.model.parallel, cfg.model.hybrid_size, info.world_size)
        device, store = init_distributed(info, cfg.run.collective_timeout_s)
        context = faults.register_rank(cfg.run.dir, store)
        lock = RunDirLock(cfg.run.dir)
        shared_from_rank0(lock.acquire, USER_ERRORS)
        _run(cfg, device, stop)
    except ReportedOnRank0:
        return 2
    except TrainingDiverged as e:  # every rank knows it (the losses are all-reduced): say it once
        if info.rank == 0:
            say(f"error {where}: {e}", sys.stderr)
        return 3
    except (*USER_ERRORS, PortInUse, ValueError) as e:
        say(f"error {where}: {e}", sys.stderr)
        return 2
    except Exception as e:  # a rank gone, a collective timed out, a full disk: one line; anything else re-raised
        return faults.report_failure(e, where, context)
    except KeyboardInterrupt:
        say(f"error {where}: interrupted", sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
