"""Run a function on N real processes joined by a gloo process group (CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alexnet_dist.distributed import LaunchInfo, free_port, init_distributed


def _entry(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    init_distributed(LaunchInfo(rank, world_size, rank, "127.0.0.1", port, "test"), timeout_s=120)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    ``fn`` must live at module level (spawn pickles it by name). A rank that raises
    makes this raise, after the other ranks are terminated.
    """
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, start_method="spawn")
