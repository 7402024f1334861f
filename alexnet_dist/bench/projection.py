"""Projected step time of the three layouts at 8 to 1,024 GPUs, from counted bytes and measured compute.

A step is a list of :class:`Collective` per rank, derived from the network's shapes
(:func:`step_collectives`); the bytes a rank sends in them are what
:data:`~alexnet_dist.exchanges.EXCHANGE_COUNTER` counts (``tests/test_projection.py`` checks
them against the bench's counts). Its time is the compute of the rank's images plus the
collectives' ring costs over two links (:class:`Links`), first with nothing overlapped, then
with the data-parallel gradient average hidden behind the backward (a bound). The model, its
assumptions and its figures are in docs/BENCHMARKS.md.

``python -m alexnet_dist.bench.projection`` prints the projection; ``--check`` runs the model
against ``bench model`` JSONs of 2 and 4 CPU ranks, the per-layer compute and gloo's loopback
measured in the same run on as many ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from alexnet_dist.model import POOLED, class_split, tower_widths
from alexnet_dist.topology import NUM_TOWERS, shares

__all__ = [
    "Collective", "Compute", "Links", "Net", "bench_compute", "check", "collective_seconds", "conv2_side",
    "exchange_bytes", "fit_links", "h100_compute", "layer_seconds", "measure_ranks", "paper_parameters", "project",
    "step_collectives", "step_seconds", "torchvision_parameters",
]

LAYOUTS = ("towers", "hybrid", "ddp")
GPUS_PER_NODE = 8
WORLDS = tuple(8 * 2**i for i in range(8))  # 8 .. 1024
LABEL_BYTES = 8  # int64 labels
# torchvision's AlexNet at width 1: conv kernels and hidden units
TV_CONVS, TV_KERNELS, TV_FC = (64, 192, 384, 256, 256), (11, 5, 3, 3, 3), 4096
# One H100, both towers, bf16 (docs/BENCHMARKS.md, "GPU: one NVIDIA H100"): images/s by batch
H100_PAPER = {128: 15_236, 256: 17_596}
H100_TORCHVISION = {128: 28_537, 256: 35_596}


@dataclass(frozen=True)
class Net:
    """What the bytes depend on: one tower's conv and fc widths, the classes, conv3's input side."""

    convs: tuple[int, ...]
    fc: int
    classes: int
    side: int
    width_mult: float = 1.0

    @classmethod
    def of(cls, width_mult: float = 1.0, classes: int = 1000, image_size: int = 224) -> Net:
        convs, fc = tower_widths(width_mult)
        return cls(convs, fc, classes, conv2_side(image_size), width_mult)


def conv2_side(image_size: int) -> int:
    """Side of conv2's pooled maps (conv3's input): conv1 11/4 pad 2, pool 3/2, conv2 'same', pool 3/2.

    >>> conv2_side(224), conv2_side(64)
    (13, 3)
    """
    def pool(side: int) -> int:
        return (side - 3) // 2 + 1

    return pool(pool((image_size + 4 - 11) // 4 + 1))


def _conv_tensors(net: Net) -> list[int]:
    """Elements of every conv weight and bias of both towers (conv3 reads both towers' conv2)."""
    c1, c2, c3, c4, c5 = net.convs
    per_tower = [3 * 121 * c1, c1, c1 * 25 * c2, c2, NUM_TOWERS * c2 * 9 * c3, c3, c3 * 9 * c4, c4, c4 * 9 * c5, c5]
    return per_tower * NUM_TOWERS


def _fc_parameters(net: Net) -> int:
    """fc6..fc8 weights and biases, both towers."""
    f, into_fc6 = net.fc, NUM_TOWERS * net.convs[-1] * POOLED**2
    return NUM_TOWERS * (into_fc6 * f + f + NUM_TOWERS * f * f + f) + NUM_TOWERS * f * net.classes + net.classes


def paper_parameters(net: Net) -> tuple[int, int]:
    """(convolutions, classifier) parameters of the two-tower network.

    >>> sum(paper_parameters(Net.of()))
    60965224
    """
    return sum(_conv_tensors(net)), _fc_parameters(net)


def torchvision_parameters(net: Net) -> int:
    """torchvision's AlexNet scaled like the bench's baseline (``torchvision_alexnet``).

    >>> torchvision_parameters(Net.of())
    61100840
    """
    def scaled(n: int) -> int:
        return n if net.width_mult == 1 else max(1, round(n * net.width_mult))

    convs, fc = [scaled(c) for c in TV_CONVS], scaled(TV_FC)
    total, inputs = 0, 3
    for c, k in zip(convs, TV_KERNELS):
        total, inputs = total + inputs * k * k * c + c, c
    return total + (inputs * POOLED**2 + 1) * fc + (fc + 1) * fc + (fc + 1) * net.classes


@dataclass(frozen=True)
class Collective:
    """One collective a rank takes part in: ``size`` bytes is the whole tensor (an all-gather's
    output, a reduce-scatter's input, an all-reduce's buffer), over ``members`` ranks of which
    ``per_node`` share a node. ``gradient``: the data-parallel average, which may overlap."""

    name: str
    kind: str  # all_gather, reduce_scatter, all_reduce
    size: int
    members: int
    per_node: int
    gradient: bool = False

    def sent(self) -> int:
        """Bytes this rank sends in a ring, in the integers EXCHANGE_COUNTER uses."""
        passes = 2 if self.kind == "all_reduce" else 1
        return passes * self.size * (self.members - 1) // self.members


def _pair(name: str, per_rank: int, members: int, grad: bool = True) -> list[Collective]:
    """An all-gather of ``per_rank`` bytes from each member, and (``grad``) its reduce-scatter backward."""
    size = per_rank * members
    forward = Collective(name, "all_gather", size, members, members)
    return [forward, replace(forward, name=name + ".grad", kind="reduce_scatter")] if grad else [forward]


def _towers(net: Net, world: int, images: int, elem: int) -> list[Collective]:
    """One tower per rank, ``images`` per replica; the pair in one node, each tower's
    replicas averaging its parameters (half the network's)."""
    c2, c5, f = net.convs[1], net.convs[-1], net.fc
    out = []
    for name, values in (("conv3", c2 * net.side**2), ("fc6", c5 * POOLED**2), ("fc7", f), ("fc8", f)):
        out += _pair(name, images * values * elem, NUM_TOWERS)
    out += _pair("logits", images * max(class_split(net.classes)) * elem, NUM_TOWERS, grad=False)
    replicas = world // NUM_TOWERS
    if replicas > 1:
        size = sum(paper_parameters(net)) // NUM_TOWERS * elem
        out.append(Collective("gradients", "all_reduce", size, replicas, min(replicas, GPUS_PER_NODE // NUM_TOWERS),
                              gradient=True))
    return out


def _hybrid(net: Net, world: int, k: int, images: int, elem: int) -> list[Collective]:
    """Groups of ``k`` ranks in one node, ``images`` per rank: the conv5 features and the
    classifier's activations gathered in the group, the convolutions' gradient summed in it
    (one all-reduce per tensor, as :func:`~alexnet_dist.exchanges.sum_gradient_over` does),
    then the groups average the convolutions, and each classifier share with the same share
    of the other groups."""
    hidden, c5 = NUM_TOWERS * net.fc, net.convs[-1]
    out = _pair("fc6", images * NUM_TOWERS * c5 * POOLED**2 * elem, k)
    for name in ("fc7", "fc8"):
        out += _pair(name, k * images * (hidden // k) * elem, k)  # K*n rows x this share's neurons
    out += _pair("logits", k * images * max(shares(net.classes, k)) * elem, k, grad=False)
    out += _pair("targets", images * LABEL_BYTES, k, grad=False)
    out += [Collective("conv.grad", "all_reduce", n * elem, k, k) for n in _conv_tensors(net)]
    groups = world // k
    if groups > 1:
        convs, fc = paper_parameters(net)
        per_node = min(groups, max(1, GPUS_PER_NODE // k))
        out += [Collective(name, "all_reduce", n * elem, groups, per_node, gradient=True)
                for name, n in (("gradients.conv", convs), ("gradients.fc", fc // k))]
    return out


def _ddp(net: Net, world: int, elem: int) -> list[Collective]:
    """torchvision's AlexNet: every parameter's gradient averaged over all ranks."""
    size = torchvision_parameters(net) * elem
    return [Collective("gradients", "all_reduce", size, world, min(world, GPUS_PER_NODE), gradient=True)]


def step_collectives(layout: str, net: Net, world: int, images: int, k: int = GPUS_PER_NODE,
                     elem: int = 4) -> list[Collective]:
    """A rank's collectives in one step. ``images``: per GPU (towers: the replica's batch is
    two GPUs' worth); ``elem``: bytes per value, activations and gradients alike.

    >>> sum(c.sent() for c in step_collectives("towers", Net.of(), 2, 16))  # BENCHMARKS: 244,688 B per image
    7830016
    >>> [c.name for c in step_collectives("hybrid", Net.of(), 16, 1)][-2:]
    ['gradients.conv', 'gradients.fc']
    """
    if layout == "towers":
        return _towers(net, world, NUM_TOWERS * images, elem)
    if layout == "hybrid":
        return _hybrid(net, world, k, images, elem)
    return _ddp(net, world, elem)


def exchange_bytes(collectives: list[Collective]) -> dict[str, int]:
    """Bytes sent per step by name, as EXCHANGE_COUNTER names them (the gradient average,
    DeepSpeed's, is not counted)."""
    out: dict[str, int] = {}
    for c in collectives:
        if not c.gradient:
            out[c.name] = out.get(c.name, 0) + c.sent()
    return out


@dataclass(frozen=True)
class Links:
    """Per-GPU bandwidth, bytes/s per direction, inside a node and between nodes, and the
    fixed cost of one collective (its latency, launch included)."""

    node: float = 450e9  # NVLink 4 on H100: 900 GB/s both directions
    net: float = 50e9  # 400 Gb/s, one NIC per GPU (DGX H100)
    latency: float = 20e-6


def collective_seconds(c: Collective, links: Links) -> float:
    """A ring inside the node; across nodes hierarchical: the node's ``per_node`` ranks split the
    tensor over their NICs, so each NIC carries 1/per_node of the inter-node ring's bytes.

    >>> ar = Collective("g", "all_reduce", 10**9, 16, 8)
    >>> round(1e3 * collective_seconds(ar, Links(latency=0)), 3)  # 2*7/8 GB/450 + 2*1/2*(1/8 GB)/50
    6.389
    """
    passes = 2 if c.kind == "all_reduce" else 1
    nodes = c.members // c.per_node
    inside = (c.per_node - 1) / c.per_node * c.size / links.node
    between = (nodes - 1) / nodes * c.size / c.per_node / links.net
    return links.latency + passes * (inside + between)


@dataclass(frozen=True)
class Compute:
    """Seconds per image of the whole network (both towers) on one device, convolutions and
    classifier apart, and torchvision's AlexNet's (DDP's)."""

    conv: float
    fc: float
    torchvision: float

    def per_image(self, layout: str) -> float:
        return self.torchvision if layout == "ddp" else self.conv + self.fc


def step_seconds(collectives: list[Collective], compute: float, links: Links) -> dict[str, float]:
    """A step's time with nothing overlapped, and the bound where the gradient average hides
    behind the backward (two thirds of the compute: twice the forward's products)."""
    exchanges = sum(collective_seconds(c, links) for c in collectives if not c.gradient)
    gradients = sum(collective_seconds(c, links) for c in collectives if c.gradient)
    return dict(compute=compute, exchanges=exchanges, gradients=gradients,
                no_overlap=compute + exchanges + gradients,
                overlap=compute + exchanges + max(0.0, gradients - 2 / 3 * compute))


def project(compute: Compute, net: Net, batch: int, elem: int = 2, k: int = GPUS_PER_NODE, links: Links = Links(),
            worlds: tuple[int, ...] = WORLDS) -> list[dict[str, Any]]:
    """Weak scaling at ``batch`` images per GPU: each layout's step time, images/s and
    efficiency against one GPU running the same network with no communication."""
    rows = []
    for layout in LAYOUTS:
        alone = batch * compute.per_image(layout)
        for world in worlds:
            t = step_seconds(step_collectives(layout, net, world, batch, k, elem), alone, links)
            rows.append(dict(layout=layout, world=world, batch=batch, **t,
                             images_per_sec=world * batch / t["no_overlap"],
                             efficiency=alone / t["no_overlap"], efficiency_overlap=alone / t["overlap"]))
    return rows


# ---------------------------------------------------------------- compute: the H100's figures or a bench JSON

PAPER_TRAIN_FLOPS = 4.136e9  # counted per image, forward and backward (docs/BENCHMARKS.md)


def h100_compute(batch: int) -> Compute:
    """One H100, bf16, at ``batch`` (128 or 256): the measured images/s; no per-layer GPU
    table exists, so the classifier's share is its share of the counted FLOPs (6 per weight)."""
    per_image = 1 / H100_PAPER[batch]
    fc = per_image * 6 * paper_parameters(Net.of())[1] / PAPER_TRAIN_FLOPS
    return Compute(per_image - fc, fc, 1 / H100_TORCHVISION[batch])


def micro_batch(result: dict[str, Any]) -> int:
    """``train.micro_batch_size`` of a ``bench model`` run: a replica's images, the single process's batch."""
    return result["global_batch"] // max(1, result["world_size"] // NUM_TOWERS)


def layer_seconds(rows: list[dict[str, Any]], batch: int) -> tuple[float, float]:
    """(convolutions, classifier) seconds per image of both towers from a per-layer table of
    tower 0 at ``batch`` (forward and backward of every step)."""
    fused = {(r["layer"], r["step"]) for r in rows if r["kernel"] == "fused"}  # on a GPU: not its eager twin
    counted = [r for r in rows if r["kernel"] == "fused" or (r["layer"], r["step"]) not in fused]

    def kind(prefix: str) -> float:
        ms = sum(r["forward_ms"] + r["backward_ms"] for r in counted if r["layer"].startswith(prefix))
        return NUM_TOWERS * ms / 1e3 / batch

    return kind("conv"), kind("fc")


def bench_compute(result: dict[str, Any]) -> Compute:
    """From a ``bench model --ranks 1`` JSON: the single process's step per image (both towers),
    split by the per-layer table's conv and fc rows; torchvision's from its DDP baseline."""
    per_image = result["variants"]["single_process"]["median_step_s"] / micro_batch(result)
    conv, fc = layer_seconds(result["layers"], micro_batch(result))
    fc = per_image * fc / (conv + fc)
    ddp = result["variants"]["ddp_torchvision"]
    return Compute(per_image - fc, fc, ddp["median_step_s"] * ddp["world_size"] / result["global_batch"])


# ---------------------------------------------------------------- the check on this host's CPU ranks

LOOPBACK_SIZES = (2**16, 2**20, 2**22, 2**24)  # bytes: the exchanges' range at reduced width, and above


def _measure(rank: int, world: int, cfg, sizes: tuple[int, ...], repeats: int, out: Path) -> None:
    """On every rank at once, as in a step: the per-layer table, then gloo all-reduces of each size."""
    import torch
    import torch.distributed as dist

    from alexnet_dist.bench.layers import layer_table
    from alexnet_dist.bench.timing import write_rank_result

    rows = layer_table(cfg, cfg.model.num_classes or 1000, steps=5, warmup=2, bandwidth=math.nan)
    seconds = {}
    for size in sizes:
        x = torch.zeros(size // 4)
        times = []
        for _ in range(repeats + 2):  # two untimed
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        seconds[size] = statistics.median(times[2:])
    write_rank_result(rank, out, dict(seconds=seconds, layers=rows))


def measure_ranks(cfg, world: int, sizes: tuple[int, ...] = LOOPBACK_SIZES, repeats: int = 7) -> dict[str, Any]:
    """Rank 0's per-layer table while all ``world`` fresh local ranks time theirs (they share the
    host's cores, as the bench's ranks do), and the median seconds of a gloo all-reduce of each
    size (bytes) over them."""
    from alexnet_dist.bench.timing import on_ranks

    measured, _ = on_ranks(world, _measure, cfg, sizes, repeats)
    return dict(layers=measured["layers"], seconds={int(k): v for k, v in measured["seconds"].items()})


def fit_links(seconds: dict[int, float], world: int) -> Links:
    """Latency and bandwidth of t = latency + 2(n-1)/n S/B fitted (least squares) to all-reduce
    times; one link, node and network alike (loopback).

    >>> l = fit_links({10**6: 1e-4 + 1e-3, 2 * 10**6: 1e-4 + 2e-3}, 2)
    >>> round(l.node / 1e9, 3), round(l.latency * 1e6, 1)
    (1.0, 100.0)
    """
    xs = [2 * (world - 1) / world * s for s in seconds]
    ys = list(seconds.values())
    slope, intercept = statistics.linear_regression(xs, ys)
    return Links(node=1 / slope, net=1 / slope, latency=intercept)


def _bench_config(result: dict[str, Any]):
    """The configuration a ``bench model`` JSON was run with, from the command it recorded."""
    import shlex

    from alexnet_dist.bench.__main__ import parse_args
    from alexnet_dist.config import load_config

    args = parse_args(shlex.split(result["command"])[3:])
    return load_config(args.config, args.set)


def check(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The model against one CPU ``bench model`` run: towers and hybrid, predicted vs measured
    step, compute and links measured now on as many ranks (:func:`measure_ranks`). The bench
    averages no gradients between replicas or groups (plain SGD), so only the exchanges count. Beside the
    step: the exchanges' predicted seconds against the seconds the rank was blocked in them
    (which include waiting for a slower partner)."""
    from alexnet_dist.bench.model import hybrid_size

    cfg, world = _bench_config(result), result["world_size"]
    net = Net.of(cfg.model.width_mult, cfg.model.num_classes or 1000, cfg.data.image_size)
    measured = measure_ranks(cfg, world)
    links = fit_links(measured["seconds"], world)
    compute = Compute(*layer_seconds(measured["layers"], cfg.train.micro_batch_size), math.nan)
    images = micro_batch(result) // NUM_TOWERS  # a GPU's worth: half a replica's, a hybrid rank's own
    rows = []
    for layout, variant, k in (("towers", "tower_parallel", NUM_TOWERS), ("hybrid", "hybrid", hybrid_size(cfg, world))):
        collectives = [c for c in step_collectives(layout, net, world, images, k) if not c.gradient]
        t = step_seconds(collectives, images * compute.per_image(layout), links)
        v = result["variants"][variant]
        blocked = v["exchange_wait_share"] * result["global_batch"] / v["images_per_sec"]  # share x mean step
        rows.append(dict(layout=layout, world=world, k=k, predicted_s=t["no_overlap"], compute_s=t["compute"],
                         exchanges_s=t["exchanges"], blocked_s=blocked, measured_s=v["median_step_s"],
                         ratio=t["no_overlap"] / v["median_step_s"], counted_bytes=v["exchange_bytes_per_step"],
                         model_bytes=sum(exchange_bytes(collectives).values()) - (k - 1) * images * LABEL_BYTES
                         * (layout == "hybrid"),  # the bench gathers the labels once, before its timed steps
                         link_gbps=links.node / 1e9, latency_us=links.latency * 1e6))
    return rows


# ---------------------------------------------------------------- command line

def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows])


def projection_table(rows: list[dict[str, Any]]) -> str:
    by = {(r["layout"], r["world"]): r for r in rows}
    header = ["GPUs"] + [f"{lay} {col}" for lay in LAYOUTS for col in ("ms", "img/s", "eff", "eff overlap")]
    body = []
    for world in sorted({r["world"] for r in rows}):
        cells = [world]
        for lay in LAYOUTS:
            r = by[(lay, world)]
            cells += [f"{1e3 * r['no_overlap']:.1f}", f"{r['images_per_sec']:,.0f}", f"{r['efficiency']:.2f}",
                      f"{r['efficiency_overlap']:.2f}"]
        body.append(cells)
    return _table(header, body)


def check_table(rows: list[dict[str, Any]]) -> str:
    header = ["layout", "ranks", "K", "link GB/s", "latency us", "bytes/step counted", "bytes/step model",
              "compute s", "exchanges s", "blocked in exchanges s", "predicted s", "measured s",
              "predicted / measured"]
    return _table(header, [[r["layout"], r["world"], r["k"] if r["layout"] == "hybrid" else "", f"{r['link_gbps']:.2f}",
                            f"{r['latency_us']:.0f}", f"{r['counted_bytes']:,.0f}", f"{r['model_bytes']:,}",
                            f"{r['compute_s']:.3f}", f"{r['exchanges_s']:.3f}", f"{r['blocked_s']:.3f}",
                            f"{r['predicted_s']:.3f}", f"{r['measured_s']:.3f}", f"{r['ratio']:.2f}"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alexnet_dist.bench.projection", description=__doc__.split("\n")[0])
    p.add_argument("--compute-json", metavar="F", help="per-image compute from this full-size, bf16 `bench model "
                   "--ranks 1 --baseline` JSON (default: the H100's measured images/s at each batch, "
                   "docs/BENCHMARKS.md)")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256], help="images per GPU (default: 128 256)")
    p.add_argument("--hybrid-size", type=int, default=GPUS_PER_NODE, help="K, the hybrid group (default: one node, 8)")
    p.add_argument("--check", metavar="JSON", nargs="+", help="instead: the model against these CPU `bench model` "
                   "runs (2 and 4 ranks), per-layer compute and gloo's loopback measured now")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON to OUT")
    args = p.parse_args(argv)
    if GPUS_PER_NODE % args.hybrid_size or args.hybrid_size % 2:
        p.error(f"--hybrid-size must be even and divide the node's {GPUS_PER_NODE} GPUs "
                "(the model keeps a group in one node)")
    if args.check:
        rows = [r for f in args.check for r in check(json.loads(Path(f).read_text()))]
        print(check_table(rows))
        out: Any = rows
    else:
        out = {}
        for batch in args.batch:
            compute = bench_compute(json.loads(Path(args.compute_json).read_text())) if args.compute_json \
                else h100_compute(batch)
            out[batch] = dict(compute=asdict(compute), links=asdict(Links()),
                              rows=project(compute, Net.of(), batch, k=args.hybrid_size))
            print(f"\n{batch} images per GPU, bf16 (2 B per value), compute per image: convolutions "
                  f"{1e6 * compute.conv:.1f} us, classifier {1e6 * compute.fc:.1f} us, "
                  f"torchvision's {1e6 * compute.torchvision:.1f} us\n")
            print(projection_table(out[batch]["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
