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

__all__ = ["HybridTopology", "NUM_TOWERS", "Topology", "shares", "topology_for"]

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


def shares(total: int, parts: int) -> tuple[int, ...]:
    """``total`` units (neurons, classes) dealt to ``parts`` holders in order, the first ones
    taking one more when it does not divide: for 2 parts, the towers' split of the classes.

    >>> shares(1000, 2), shares(5, 2), shares(5, 4), shares(4096, 4)
    ((500, 500), (3, 2), (2, 1, 1, 1), (1024, 1024, 1024, 1024))
    """
    base, extra = divmod(total, parts)
    return tuple(base + (i < extra) for i in range(parts))


@dataclass(frozen=True)
class HybridTopology:
    """Krizhevsky 2014 ("One weird trick"): groups of ``size`` consecutive ranks; every rank
    runs all the convolutions on its own images, and rank ``j`` of a group (its *slice*)
    holds the ``j``-th share of fc6's, fc7's and fc8's neurons for the whole group's images.
    The ranks holding the same slice in every group are one data-parallel group (DeepSpeed
    averages over it); a group is DeepSpeed's "model-parallel" group. Every rank is its own
    input replica.

    >>> topo = HybridTopology(8, 4)
    >>> topo.data_parallel_size, [topo.group_of(r) for r in range(8)], [topo.slice_of(r) for r in range(8)]
    (2, [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3])
    >>> topo.group_ranks(1), topo.data_parallel_ranks(2)
    ((4, 5, 6, 7), (2, 6))
    >>> HybridTopology(6, 4)
    Traceback (most recent call last):
    ...
    ValueError: model.hybrid_size=4 does not divide the world size 6: use a multiple of 4 ranks, or a hybrid_size that divides 6
    """

    world_size: int
    size: int  # model.hybrid_size: ranks sharing one classifier

    def __post_init__(self) -> None:
        if self.size < 2 or self.size % 2:
            raise ValueError(f"model.hybrid_size must be even and at least 2, got {self.size}")
        if self.world_size % self.size:
            raise ValueError(f"model.hybrid_size={self.size} does not divide the world size {self.world_size}: use a "
                             f"multiple of {self.size} ranks, or a hybrid_size that divides {self.world_size}")

    @property
    def data_parallel_size(self) -> int:
        """Number of groups (each a whole copy of the network)."""
        return self.world_size // self.size

    def group_of(self, rank: int) -> int:
        return rank // self.size

    def slice_of(self, rank: int) -> int:
        """Which share of the classifier's neurons ``rank`` holds."""
        return rank % self.size

    def group_ranks(self, group: int) -> tuple[int, ...]:
        first = group * self.size
        return tuple(range(first, first + self.size))

    def data_parallel_ranks(self, slice_: int) -> tuple[int, ...]:
        """Ranks holding slice ``slice_`` in every group."""
        return tuple(range(slice_, self.world_size, self.size))


def topology_for(parallel: str, hybrid_size: int, world_size: int) -> Topology | HybridTopology:
    """The layout of ``model.parallel`` on ``world_size`` ranks (raises on an impossible one).
    One process holds the single-process network whichever is asked for.

    >>> topology_for("hybrid", 4, 1), topology_for("hybrid", 4, 8)
    (Topology(world_size=1), HybridTopology(world_size=8, size=4))
    """
    if parallel == "hybrid" and world_size > 1:
        return HybridTopology(world_size, hybrid_size)
    return Topology(world_size)
