"""Rank arithmetic for the two-tower layout: pure functions, no process groups.

A *replica* is one copy of the whole network. With more than one rank, a replica is
a pair of consecutive ranks (2p, 2p+1) -- tower 0 and tower 1 -- so the pair shares a
node and its fast link. With one rank, that rank holds both towers. Replicas are
data parallel: the data-parallel group of tower t is every rank holding tower t.

>>> topo = Topology(4)
>>> topo.tower_parallel_size, topo.data_parallel_size
(2, 2)
>>> [topo.towers_of(r) for r in range(4)]
[(0,), (1,), (0,), (1,)]
>>> [topo.replica_of(r) for r in range(4)]
[0, 0, 1, 1]
>>> topo.pair_ranks(1)
(2, 3)
>>> topo.data_parallel_ranks(1)
(1, 3)
>>> Topology(1).towers_of(0), Topology(1).data_parallel_size
((0, 1), 1)
>>> Topology(3)
Traceback (most recent call last):
...
ValueError: world size 3 is odd: two towers per replica need an even number of ranks (3 = 2 x 1 + 1); use 1 rank (both towers in one process) or 2, 4, 6, ...
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NUM_TOWERS", "Topology"]

NUM_TOWERS = 2


@dataclass(frozen=True)
class Topology:
    """Where each tower of each replica lives, for a world of ``world_size`` ranks."""

    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be at least 1, got {self.world_size}")
        if self.world_size > 1 and self.world_size % NUM_TOWERS:
            pairs, rest = divmod(self.world_size, NUM_TOWERS)
            raise ValueError(
                f"world size {self.world_size} is odd: two towers per replica need an even "
                f"number of ranks ({self.world_size} = {NUM_TOWERS} x {pairs} + {rest}); "
                "use 1 rank (both towers in one process) or 2, 4, 6, ..."
            )

    @property
    def tower_parallel_size(self) -> int:
        """Ranks per replica: 1 (both towers local) or 2 (one tower per rank)."""
        return 1 if self.world_size == 1 else NUM_TOWERS

    @property
    def data_parallel_size(self) -> int:
        """Number of replicas."""
        return self.world_size // self.tower_parallel_size

    def towers_of(self, rank: int) -> tuple[int, ...]:
        """Tower indices held by ``rank``."""
        self._check(rank)
        if self.tower_parallel_size == 1:
            return tuple(range(NUM_TOWERS))
        return (rank % NUM_TOWERS,)

    def replica_of(self, rank: int) -> int:
        """Data-parallel index of ``rank`` (which replica it belongs to)."""
        self._check(rank)
        return rank // self.tower_parallel_size

    def pair_rank_of(self, rank: int) -> int:
        """Position of ``rank`` inside its replica's tower group."""
        self._check(rank)
        return rank % self.tower_parallel_size

    def pair_ranks(self, replica: int) -> tuple[int, ...]:
        """Ranks that together hold replica ``replica`` (its tower-parallel group)."""
        first = replica * self.tower_parallel_size
        return tuple(range(first, first + self.tower_parallel_size))

    def data_parallel_ranks(self, pair_rank: int) -> tuple[int, ...]:
        """Ranks at position ``pair_rank`` of every replica (one data-parallel group)."""
        return tuple(range(pair_rank, self.world_size, self.tower_parallel_size))

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
