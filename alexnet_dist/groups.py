"""The process groups of each layout, and DeepSpeed's ``mpu`` over them.

:class:`TowerGroups` (``model.parallel: towers``) and :class:`HybridGroups` (``hybrid``)
build every group on every rank (``new_group`` is collective: all ranks must create all
groups in the same order) from the pure :mod:`~alexnet_dist.topology`. DeepSpeed calls
the ranks that split one network the "model-parallel" group and averages gradients over
``get_data_parallel_group()`` only: the ranks holding the same weights.

Both answer the trainer the same questions: where this rank's input comes from
(:meth:`~TowerGroups.train_input`, :meth:`~TowerGroups.val_input`), the labels of the
logits it computes (:meth:`~TowerGroups.targets`), which towers' checkpoint files it reads
(``towers``) and whether it writes them (``writes_towers``).
"""

from __future__ import annotations

import datetime
from typing import NamedTuple

import torch.distributed as dist
from torch import Tensor

from alexnet_dist.exchanges import gather_batch, gather_targets
from alexnet_dist.topology import NUM_TOWERS, HybridTopology, Topology, topology_for

__all__ = ["HybridGroups", "TowerGroups", "groups_for"]


def _timeout(timeout_s: float | None) -> datetime.timedelta | None:
    # new_group does not inherit the default group's timeout (it gets torch's 30
    # minutes): without this a hung partner holds a group for half an hour.
    return None if timeout_s is None else datetime.timedelta(seconds=timeout_s)


def _build(all_ranks: list[tuple[int, ...]], mine: tuple[int, ...],
           timeout: datetime.timedelta | None) -> dist.ProcessGroup | None:
    """Create every group in ``all_ranks`` (collectively) and return the one holding this rank."""
    found = None
    if not dist.is_initialized():
        return found
    for ranks in all_ranks:
        group = dist.new_group(list(ranks), timeout=timeout)
        if ranks == mine:
            found = group
    return found


def groups_for(parallel: str, hybrid_size: int, timeout_s: float | None = None) -> TowerGroups | HybridGroups:
    """The groups of ``model.parallel`` over the initialised world (one process without it:
    the single-process network either way)."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    topology = topology_for(parallel, hybrid_size, world)
    if isinstance(topology, HybridTopology):
        return HybridGroups(topology, rank, timeout_s)
    return TowerGroups(topology, rank, timeout_s)


class Place(NamedTuple):
    """A rank's place in a set of groups: its rank in its group, the group's size, the group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None


class _DeepSpeedMpu:
    """DeepSpeed's ``mpu`` interface over a layout's groups. A layout sets ``model_parallel``
    (this rank's place among the ranks splitting one network: rank, size, group) and
    ``data_parallel`` (among the ranks holding the same weights)."""

    model_parallel: Place
    data_parallel: Place

    def get_model_parallel_rank(self) -> int:
        return self.model_parallel.rank

    def get_model_parallel_world_size(self) -> int:
        return self.model_parallel.size

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.model_parallel.group

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel.rank

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel.size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.data_parallel.group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


class TowerGroups(_DeepSpeedMpu):
    """This rank's place in the layout and its process groups.

    Groups of one member are real groups too: DeepSpeed reads ``None`` as "the whole
    world", which would average tower 0 with tower 1. Without an initialised default
    group (a plain single process) every group is ``None``.
    """

    def __init__(self, topology: Topology, rank: int, timeout_s: float | None = None) -> None:
        timeout = _timeout(timeout_s)
        self.topology = topology
        self.rank = rank
        self.towers = topology.towers_of(rank)
        self.replica = topology.replica_of(rank)
        self.pair_rank = topology.pair_rank_of(rank)
        self.writes_towers = self.replica == 0  # replica 0's ranks hold one tower each
        self.pair_group = _build(
            [topology.pair_ranks(r) for r in range(topology.data_parallel_size)], topology.pair_ranks(self.replica),
            timeout,
        )
        self.data_group = _build(
            [topology.data_parallel_ranks(p) for p in range(topology.tower_parallel_size)],
            topology.data_parallel_ranks(self.pair_rank), timeout,
        )
        # "model parallel" to DeepSpeed: the towers of one replica
        self.model_parallel = Place(self.pair_rank, topology.tower_parallel_size, self.pair_group)
        self.data_parallel = Place(self.replica, topology.data_parallel_size, self.data_group)

    @classmethod
    def from_world(cls, timeout_s: float | None = None) -> TowerGroups:
        """Groups for the initialised default process group (or one process without it);
        ``timeout_s`` bounds their collectives."""
        if not dist.is_initialized():
            return cls(Topology(1), 0)
        return cls(Topology(dist.get_world_size()), dist.get_rank(), timeout_s)

    def gather_batch(self, local: Tensor) -> Tensor:
        """The replica's input batch from this rank's decoded part: the feeds' ``gather``
        (N/2 x 3 x S x S uint8 per rank -> N x 3 x S x S on both ranks of the pair)."""
        return gather_batch(local, self.pair_group)

    def train_input(self) -> dict:
        """The feed's place: the replica's batch, of which this rank decodes its pair's part."""
        return dict(replica=self.replica, num_replicas=self.topology.data_parallel_size, pair_rank=self.pair_rank,
                    pair_size=self.topology.tower_parallel_size, gather=self.gather_batch)

    val_input = train_input

    def targets(self, y: Tensor) -> Tensor:
        """The labels of this rank's logits: its replica's batch, already here."""
        return y


class HybridGroups(_DeepSpeedMpu):
    """This rank's place in the hybrid layout (:class:`~alexnet_dist.topology.HybridTopology`):
    its group (DeepSpeed's "model-parallel" group: the ranks sharing one classifier) and the
    ranks holding the same share in every group (the data-parallel group, over which
    DeepSpeed averages every gradient). The convolutions' gradients are summed over the
    group inside autograd (:class:`~alexnet_dist.hybrid.HybridAlexNet`), so that average
    is over the groups; each share is averaged with its own copies only.
    """

    def __init__(self, topology: HybridTopology, rank: int, timeout_s: float | None = None) -> None:
        timeout = _timeout(timeout_s)
        self.topology, self.rank = topology, rank
        self.towers = tuple(range(NUM_TOWERS))  # every rank reads both towers' checkpoint files
        self.replica = topology.group_of(rank)  # one copy of the network: dropout seeds, evaluation
        self.slice = topology.slice_of(rank)
        self.writes_towers = rank == 0  # group 0 gathers the shares; one rank writes them
        self.hybrid_group = _build([topology.group_ranks(g) for g in range(topology.data_parallel_size)],
                                   topology.group_ranks(self.replica), timeout)
        self.data_group = _build([topology.data_parallel_ranks(j) for j in range(topology.size)],
                                 topology.data_parallel_ranks(self.slice), timeout)
        # "model parallel" to DeepSpeed: the group splitting one classifier
        self.model_parallel = Place(self.slice, topology.size, self.hybrid_group)
        self.data_parallel = Place(self.replica, topology.data_parallel_size, self.data_group)

    def train_input(self) -> dict:
        """Every rank is its own input replica: the sampler's order over the whole world, as
        one process's, and no image gather (the conv5 features are gathered instead)."""
        return dict(replica=self.rank, num_replicas=self.topology.world_size, pair_rank=0, pair_size=1, gather=None)

    def val_input(self) -> dict:
        """Each group is one validation replica, and each of its ranks decodes the group's whole
        batch (the network's eval mode reads the group's batch on every rank; the feeds split
        a batch over two ranks at most)."""
        return dict(replica=self.replica, num_replicas=self.topology.data_parallel_size, pair_rank=0, pair_size=1,
                    gather=None)

    def targets(self, y: Tensor) -> Tensor:
        """The labels of the group's images (N per rank -> K*N), the rows of this rank's logits."""
        return gather_targets(y, self.hybrid_group)
