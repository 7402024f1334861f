"""One process of the training job behind ``train.py``: find the rank, start
torch.distributed, build the parts, train, and turn every way of failing into an exit
status with one line.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch
import yaml

from alexnet_dist import faults
from alexnet_dist.build import USER_ERRORS, build
from alexnet_dist.checkpoint import CheckpointError
from alexnet_dist.config import Config, ConfigError, load_config
from alexnet_dist.distributed import ReportedOnRank0, discover, init_distributed, is_rank0, shared_from_rank0
from alexnet_dist.metrics import say
from alexnet_dist.topology import Topology
from alexnet_dist.training import Trainer

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the two-tower AlexNet (see train.py's docstring).")
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run(cfg: Config, device: torch.device) -> None:
    trainer = Trainer(build(cfg, device))
    signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
    trainer.resume()
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


def _write_resolved_config(cfg: Config) -> None:
    run_dir = Path(cfg.run.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir} is not writable: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = discover()
    where = f"[rank {info.rank}/{info.world_size}]"
    try:
        cfg = load_config(args.config, args.set)
        Topology(info.world_size)
        device = init_distributed(info, cfg.run.collective_timeout_s)
        faults.register_rank(cfg.run.dir)
        shared_from_rank0(lambda: _write_resolved_config(cfg), USER_ERRORS)
        _run(cfg, device)
    except ReportedOnRank0:
        return 2
    except (*USER_ERRORS, ValueError) as e:
        say(f"error {where}: {e}", sys.stderr)
        return 2
    except Exception as e:  # a rank gone, a collective timed out, a full disk: one line; anything else re-raised
        return faults.report_failure(e, where)
    except KeyboardInterrupt:
        say(f"error {where}: interrupted", sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
