"""The process groups of the two-tower layout, and DeepSpeed's ``mpu`` over them.

:class:`TowerGroups` builds every group on every rank (``new_group`` is collective:
all ranks must create all groups in the same order) from the pure
:class:`~alexnet_dist.topology.Topology`. DeepSpeed calls the tower-parallel group
the "model-parallel" group and averages gradients over ``get_data_parallel_group()``
only, so each tower is averaged with its own replicas and never with the other tower.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist
from torch import Tensor

from alexnet_dist.exchanges import gather_batch
from alexnet_dist.topology import Topology

__all__ = ["TowerGroups"]


class TowerGroups:
    """This rank's place in the layout and its process groups.

    Groups of one member are real groups too: DeepSpeed reads ``None`` as "the whole
    world", which would average tower 0 with tower 1. Without an initialised default
    group (a plain single process) every group is ``None``.
    """

    def __init__(self, topology: Topology, rank: int, timeout_s: float | None = None) -> None:
        # new_group does not inherit the default group's timeout (it gets torch's 30
        # minutes): without this a hung partner holds a pair for half an hour.
        self._timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self.topology = topology
        self.rank = rank
        self.towers = topology.towers_of(rank)
        self.replica = topology.replica_of(rank)
        self.pair_rank = topology.pair_rank_of(rank)
        self.pair_group = self._build(
            [topology.pair_ranks(r) for r in range(topology.data_parallel_size)], topology.pair_ranks(self.replica)
        )
        self.data_group = self._build(
            [topology.data_parallel_ranks(p) for p in range(topology.tower_parallel_size)],
            topology.data_parallel_ranks(self.pair_rank),
        )

    @classmethod
    def from_world(cls, timeout_s: float | None = None) -> TowerGroups:
        """Groups for the initialised default process group (or one process without it);
        ``timeout_s`` bounds their collectives."""
        if not dist.is_initialized():
            return cls(Topology(1), 0)
        return cls(Topology(dist.get_world_size()), dist.get_rank(), timeout_s)

    def _build(self, all_ranks: list[tuple[int, ...]], mine: tuple[int, ...]) -> dist.ProcessGroup | None:
        """Create every group in ``all_ranks`` (collectively) and return the one holding this rank."""
        found = None
        if not dist.is_initialized():
            return found
        for ranks in all_ranks:
            group = dist.new_group(list(ranks), timeout=self._timeout)
            if ranks == mine:
                found = group
        return found

    def gather_batch(self, local: Tensor) -> Tensor:
        """The replica's input batch from this rank's decoded part: the feeds' ``gather``
        (N/2 x 3 x S x S uint8 per rank -> N x 3 x S x S on both ranks of the pair)."""
        return gather_batch(local, self.pair_group)

    # ---- DeepSpeed's mpu interface: "model parallel" = the towers of one replica.

    def get_model_parallel_rank(self) -> int:
        return self.pair_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topology.tower_parallel_size

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.pair_group

    def get_data_parallel_rank(self) -> int:
        return self.replica

    def get_data_parallel_world_size(self) -> int:
        return self.topology.data_parallel_size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.data_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
