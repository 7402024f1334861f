"""Run a function on N real processes joined by a gloo process group (CPU)."""

from alexnet_dist.distributed import spawn_ranks


def run_ranks(world_size: int, fn, *args) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks, one torch thread each."""
    spawn_ranks(world_size, fn, *args, threads=1)
