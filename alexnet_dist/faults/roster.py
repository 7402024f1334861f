"""Every rank's host, pid and address, gathered once when the job starts, so that a
survivor of a failure can name the rank that is gone."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["RankInfo", "Roster", "gather_roster", "pid_alive"]


@dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str
    pid: int
    addr: str  # this host's address towards the master (what peers see in gloo errors)


@dataclass(frozen=True)
class Roster:
    """This rank's place and every rank's :class:`RankInfo`, in rank order."""

    rank: int
    world_size: int
    ranks: tuple[RankInfo, ...]

    def dead_on_this_host(self) -> set[int]:
        """Other ranks of this host whose process is gone."""
        host = socket.gethostname()
        return {r.rank for r in self.ranks if r.host == host and r.rank != self.rank and not pid_alive(r.pid)}

    def who(self, ranks) -> str:
        """``rank 1 (pid 123 on node2), rank 3``: ranks named with what is known of them."""
        by_rank = {r.rank: r for r in self.ranks}
        return ", ".join(f"rank {rank} (pid {by_rank[rank].pid} on {by_rank[rank].host})" if rank in by_rank
                         else f"rank {rank}" for rank in sorted(ranks))

    def hosts_at(self, address: str) -> str:
        """The host behind a peer address of a gloo error, with its ranks."""
        ranks = [r for r in self.ranks if r.addr == address]
        if not ranks:
            return address
        return f"{ranks[0].host} ({address}: ranks {', '.join(str(r.rank) for r in ranks)})"


def _address_towards(master: str) -> str:
    """The local address this host uses to reach ``master`` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            return s.getsockname()[0]
    except OSError:
        return "?"


def gather_roster() -> Roster | None:
    """Every rank's :class:`RankInfo` (collective); None outside torch.distributed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    me = asdict(RankInfo(rank, socket.gethostname(), os.getpid(),
                         _address_towards(os.environ.get("MASTER_ADDR", "127.0.0.1"))))
    everyone: list = [me]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, me)
    return Roster(rank, world_size, tuple(RankInfo(**e) for e in everyone))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its launcher has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
