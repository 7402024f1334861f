"""Every collective of the system, in three layers (after Megatron's ``mappings.py``).

1. Private primitives (``_all_gather``, ``_reduce_scatter``, ``_split``): one collective
   each, allocated on the input's device, skipped when the group has one member, and
   counted in :data:`EXCHANGE_COUNTER` (bytes this rank sends to its partner towers).
2. Autograd Functions named for their direction, e.g. ``_AllGatherForwardReduceScatterBackward``.
   Gathers move dim-0 blocks (the collectives' native layout) and start
   asynchronously, so the model can compute while an exchange is in flight.
3. Public wrappers that the model, the input pipeline and the evaluation call.

The backward rule (docs/ARCHITECTURE.md): when every tower applies its *own* weights to the
gathered tensor, each tower's slice of that tensor influences the loss through every
tower, so its gradient is the *sum* over towers of their gradients for that slice:
forward all-gather, backward reduce-scatter. A plain split there silently drops
half of the gradient. When the gathered tensor feeds a computation that every rank
repeats identically (the loss over the gathered logits), each rank already holds the
whole gradient: forward all-gather, backward split.

A group of one member (or ``None``, outside torch.distributed) means the caller
holds every tower: the collective is skipped and nothing is sent.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "EXCHANGE_COUNTER",
    "ExchangeCounter",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "gather_batch",
    "gather_logits",
    "gather_rows",
    "gather_targets",
    "PendingExchange",
    "start_gather_from_towers",
    "sum_gradient_over",
]


class ExchangeCounter:
    """Bytes this rank has sent to its partner towers, per exchange name, and the host
    seconds it spent blocked waiting for exchanges.

    Counted from the tensors actually handed to the collectives, so the benchmark's
    ``exchange_bytes_per_image`` is a measurement, not a formula. The seconds bound
    what overlapping exchanges with compute can save (on CPUs; NCCL's waits only
    order GPU streams, so on GPUs they read near 0).
    """

    def __init__(self) -> None:
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.seconds_waiting: dict[str, float] = defaultdict(float)

    def add(self, name: str, nbytes: int) -> None:
        self.bytes_sent[name] += nbytes

    @contextmanager
    def waiting(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds_waiting[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.seconds_waiting.clear()

    def total(self) -> int:
        return sum(self.bytes_sent.values())


EXCHANGE_COUNTER = ExchangeCounter()


# ---------------------------------------------------------------- 1. primitives


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _all_gather_start(x: Tensor, group: dist.ProcessGroup | None, name: str) -> tuple[Tensor, dist.Work | None]:
    """Start gathering every member's ``x`` as dim-0 blocks (member i: rows i*N..(i+1)*N)."""
    size = _group_size(group)
    if size == 1:
        return x, None
    x = x.contiguous()
    blocks = x.new_empty((size * x.shape[0], *x.shape[1:]))
    work = dist.all_gather_single(blocks, x, group=group, async_op=True)
    EXCHANGE_COUNTER.add(name, _nbytes(x) * (size - 1))
    return blocks, work


def _blocks_to_dim(blocks: Tensor, size: int, dim: int) -> Tensor:
    """Dim-0 blocks of ``size`` members -> the members' tensors concatenated along ``dim``."""
    return blocks if size == 1 else torch.cat(blocks.chunk(size, 0), dim)


def _all_gather(x: Tensor, group: dist.ProcessGroup | None, dim: int, name: str) -> Tensor:
    """Concatenate every group member's ``x`` along ``dim``, in group-rank order."""
    blocks, work = _all_gather_start(x, group, name)
    if work is not None:
        with EXCHANGE_COUNTER.waiting(name):
            work.wait()
    return _blocks_to_dim(blocks, _group_size(group), dim)


def _reduce_scatter_blocks(blocks: Tensor, group: dist.ProcessGroup | None, name: str) -> Tensor:
    """Sum dim-0 blocks over the group and keep this member's block."""
    size = _group_size(group)
    if size == 1:
        return blocks
    if blocks.shape[0] % size:  # each member's block must be whole, or rows would be dropped unseen
        raise ValueError(f"reduce-scatter of {blocks.shape[0]} rows over {size} members: not a whole block each")
    blocks = blocks.contiguous()
    out = blocks.new_empty((blocks.shape[0] // size, *blocks.shape[1:]))
    with EXCHANGE_COUNTER.waiting(name):
        dist.reduce_scatter_single(out, blocks, group=group)
    EXCHANGE_COUNTER.add(name, _nbytes(blocks) * (size - 1) // size)
    return out


def _split(x: Tensor, group: dist.ProcessGroup | None, dim: int) -> Tensor:
    """This rank's equal slice of ``x`` along ``dim``; no communication."""
    size = _group_size(group)
    if size == 1:
        return x
    return x.chunk(size, dim)[dist.get_rank(group)].contiguous()


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None, name: str) -> Tensor:
    """Sum ``x`` over the group (a new tensor)."""
    size = _group_size(group)
    if size == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    with EXCHANGE_COUNTER.waiting(name):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    EXCHANGE_COUNTER.add(name, 2 * _nbytes(x) * (size - 1) // size)  # a ring's reduce-scatter + all-gather
    return x


# ---------------------------------------------------------------- 2. autograd Functions


class _AllGatherForwardReduceScatterBackward(torch.autograd.Function):
    """Forward: all-gather into dim-0 blocks, started asynchronously (the work handle is
    appended to ``pending``). Backward: reduce-scatter (sum) of the blocks' gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group, name: str, pending: list) -> Tensor:
        ctx.group, ctx.name = group, name
        blocks, work = _all_gather_start(x, group, name)
        pending.append(work)
        return blocks

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_blocks(grad, ctx.group, ctx.name + ".grad"), None, None, None


class _AllGatherForwardSplitBackward(torch.autograd.Function):
    """Forward: all-gather along ``dim``. Backward: keep own slice (no communication)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int, name: str) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim, name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _split(grad, ctx.group, ctx.dim), None, None, None


class _IdentityForwardAllReduceBackward(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) of the gradient over the group."""

    @staticmethod
    def forward(ctx, x: Tensor, group, name: str) -> Tensor:
        ctx.group, ctx.name = group, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group, ctx.name), None, None


# ---------------------------------------------------------------- 3. public wrappers


class PendingExchange:
    """A cross-tower gather in flight: :meth:`wait` returns the full activation."""

    def __init__(self, blocks: Tensor, work: dist.Work | None, size: int, dim: int, name: str) -> None:
        self._blocks, self._work, self._size, self._dim, self._name = blocks, work, size, dim, name

    def wait(self) -> Tensor:
        if self._work is not None:
            with EXCHANGE_COUNTER.waiting(self._name):
                self._work.wait()
        return _blocks_to_dim(self._blocks, self._size, self._dim)


def start_gather_from_towers(
    local: Sequence[Tensor], group: dist.ProcessGroup | None, name: str, dim: int = 1
) -> PendingExchange:
    """Start gathering every tower's activation, concatenated along ``dim`` in tower order.

    ``local`` holds this rank's towers' tensors (one, or both in the single-process
    reference). The result feeds layers with per-tower weights, hence the
    reduce-scatter backward. Compute that does not need the result may run before
    :meth:`PendingExchange.wait`: that is how the model overlaps exchanges.
    """
    x = local[0] if len(local) == 1 else torch.cat(list(local), dim)
    pending: list = []
    blocks = _AllGatherForwardReduceScatterBackward.apply(x, group, name, pending)
    return PendingExchange(blocks, pending[0], _group_size(group), dim, name)


def gather_logits(
    local: Sequence[Tensor], group: dist.ProcessGroup | None, sizes: Sequence[int]
) -> Tensor:
    """The full N x num_classes logits from every tower's class slice.

    Tower t owns ``sizes[t]`` classes; slices are padded to the largest so that the
    all-gather moves equal tensors, then trimmed. Every rank then computes the same
    loss, so the backward only keeps this rank's slice.
    """
    if len(local) == len(sizes):
        return torch.cat(list(local), 1)
    width = max(sizes)
    (mine,) = local
    padded = torch.nn.functional.pad(mine, (0, width - mine.shape[1]))
    gathered = _AllGatherForwardSplitBackward.apply(padded, group, 1, "logits")
    slices = gathered.split(width, 1)
    return torch.cat([s[:, :n] for s, n in zip(slices, sizes)], 1)


def sum_gradient_over(weight: Tensor, group: dist.ProcessGroup | None, name: str = "conv.grad") -> Tensor:
    """``weight`` itself, whose gradient is summed over ``group`` on the way back.

    The hybrid layout's convolutions: every rank of a group applies the same weights to its
    own images, so the weights' gradient is the sum of the ranks' gradients. Summed inside
    autograd, it reaches ``.grad`` (and DeepSpeed's averaging over the groups) already whole.
    """
    return _IdentityForwardAllReduceBackward.apply(weight, group, name)


@torch.no_grad()
def gather_targets(y: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The labels of every member's images, concatenated along dim 0 in group-rank order
    (N -> size*N: the rows of the hybrid layout's logits)."""
    return _all_gather(y, group, 0, "targets")


@torch.no_grad()
def gather_rows(x: Tensor, group: dist.ProcessGroup | None, sizes: Sequence[int]) -> Tensor:
    """Every member's ``x`` (member i: ``sizes[i]`` rows) concatenated along dim 0: a weight
    split by rows (neurons, classes) made whole again. Padded to the largest share for
    the collective, then trimmed, as :func:`gather_logits` does."""
    if _group_size(group) == 1:
        return x
    width = max(sizes)
    padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))]) if x.shape[0] < width else x
    blocks = _all_gather(padded, group, 0, "checkpoint").split(width)
    return torch.cat([b[:n] for b, n in zip(blocks, sizes)])


@torch.no_grad()
def gather_batch(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate the group's batches along dim 0 (a decoded input batch; no autograd)."""
    return _all_gather(x, group, 0, "input")


@torch.no_grad()
def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``x`` over the group in place and return it (evaluation counts)."""
    if _group_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def barrier() -> None:
    """Every rank of the world reaches this point (no-op outside torch.distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Global rank ``src``'s picklable ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank of the world."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
