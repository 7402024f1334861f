"""A tiny torch.distributed program standing in for ``train.py`` in the launcher tests.

It finds its rank the way the trainer does (:func:`alexnet_dist.distributed.discover`:
RANK/WORLD_SIZE from DeepSpeed's launcher, SLURM_* under ``srun``, mpi4py under
``mpirun``), joins the default process group, all-reduces ``rank + 1`` and gathers
every rank's hostname. Rank 0 writes ``--out``::

    {"world_size": 4, "sum": 10.0, "ranks": [{"rank": 0, "host": "node1", ...}, ...]}

Run it through any launcher, e.g. ``deepspeed --hostfile H tests/toy_dist.py --out r.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may take")
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank exits with status 3 after joining")
    # DeepSpeed's launcher appends --local_rank=N; the rank comes from the env anyway.
    args, _ = parser.parse_known_args(argv)

    import torch
    import torch.distributed as dist

    from alexnet_dist.distributed import discover, init_distributed

    torch.set_num_threads(1)
    info = discover()
    init_distributed(info, timeout_s=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()

    if rank == args.fail_rank:  # a dying rank, for the launchers' failure handling
        sys.stderr.write(f"toy_dist rank {rank}: failing on purpose\n")
        os._exit(3)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    me = {"rank": rank, "local_rank": info.local_rank, "host": socket.gethostname(),
          "source": info.source, "master_addr": info.master_addr}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, me)
    # One write per line: ranks sharing a terminal would interleave otherwise.
    sys.stdout.write(f"toy_dist rank {rank}/{world} on {me['host']} via {info.source}: sum {total.item()}\n")
    sys.stdout.flush()

    if rank == 0:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump({"world_size": world, "sum": total.item(), "ranks": everyone}, f, indent=1)
        os.replace(tmp, args.out)  # readers never see a half-written file
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
