"""``bench model``: forward, backward and SGD step on synthetic input already on the device.

Variants, each on its own freshly spawned ranks, at the same global batch:

* ``tower_parallel``: this project, one tower per rank (the pair exchanges activations),
  with ``train.exchange_chunks`` chunks; ``tower_parallel_no_overlap`` beside it when
  that is above 1 (every exchange waited for at once), and ``overlap_on_vs_off``, the
  median over rounds of the first's images/s over the second's;
* ``single_process``: both towers in one process (the reference layout);
* ``hybrid`` (an even number of ranks): ``model.parallel: hybrid`` in groups of
  ``model.hybrid_size`` ranks (of all the ranks when that does not divide them), each rank
  its share of the global batch; ``exchange_bytes_per_step`` is what one rank sends per
  step, the convolutions' gradient sum over the group included;
* ``ddp_torchvision`` (``--baseline``): torchvision's single-tower AlexNet under plain DDP,
  the global batch split over the ranks (all-reduces every gradient each step);
* ``pipeline_deepspeed`` (``--baseline``, 2 ranks or more): the paper's network as one
  layer list cut into 2 stages by DeepSpeed's ``PipelineModule``, the batch split into
  micro-batches.

With ``--ranks 1`` (one GPU) the project's figure is ``single_process``: both towers on
the one device. Every variant reports the TFLOP/s its convolutions and matrix products
do (counted by ``torch.utils.flop_counter`` on one image, forward and backward), and the
project's share of this device's matrix-product rate in the run's precision, measured
in the same run. A per-layer table (:mod:`alexnet_dist.bench.layers`) times every step of a
tower on its own, with the memory-bound ReLU + LRN + max-pool steps against the device's
copy bandwidth.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_dist.bench.layers import copy_bandwidth_gbps, layer_table, norm_pool_errors
from alexnet_dist.bench.timing import (bench_device, median_round, on_ranks, round_ratios, summarise, time_steps,
                                       write_rank_result)
from alexnet_dist.config import Config, torch_dtype
from alexnet_dist.exchanges import EXCHANGE_COUNTER
from alexnet_dist.groups import HybridGroups, TowerGroups
from alexnet_dist.hybrid import HybridAlexNet
from alexnet_dist.metrics import quiet_stdout
from alexnet_dist.model import POOLED, AlexNet, LocalResponseNorm, memory_format_for, tower_widths
from alexnet_dist.topology import HybridTopology

__all__ = [
    "bench_model", "grouped_alexnet_layers", "matmul_peak_tflops", "numerics_check", "project_variant", "run_variant",
    "torchvision_alexnet", "train_flops_per_image",
]

PIPELINE_MICRO_BATCHES = 4


def _batch(cfg: Config, n: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = x.to(bench_device(), cfg.train.torch_dtype).contiguous(memory_format=memory_format_for(bench_device()))
    return x, y.to(bench_device())


def _sgd(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=t.momentum, weight_decay=t.weight_decay)


def _prepare(model: nn.Module, cfg: Config) -> nn.Module:
    return model.to(bench_device(), cfg.train.torch_dtype)  # contiguous parameters, as training has them


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _finish(rank: int, times: list[float], images_per_step: int, out: Path, extra: dict[str, Any]) -> None:
    """Each rank writes its figures; the parent merges them."""
    write_rank_result(rank, out, dict(summarise(times, images_per_step), **extra))


def _tower_parallel(rank: int, world: int, cfg: Config, num_classes: int, steps: int, warmup: int, out: Path) -> None:
    g = TowerGroups.from_world()
    model = _prepare(AlexNet(num_classes, cfg.model.width_mult, cfg.model.dropout, cfg.model.init,
                             towers=g.towers, group=g.pair_group, seed=0,
                             exchange_chunks=cfg.train.exchange_chunks), cfg)
    per_replica = cfg.train.micro_batch_size
    x, y = _batch(cfg, per_replica, num_classes, seed=g.replica)  # both towers of a replica: same images
    step = _sgd_step(model, _sgd(model, cfg), x, y)
    times = time_steps(step, steps, warmup, bench_device(), after_warmup=EXCHANGE_COUNTER.reset)
    _finish(rank, times, per_replica * g.topology.data_parallel_size, out, _exchanges(times, per_replica, steps))


def _exchanges(times: list[float], images_per_step: int, steps: int) -> dict[str, Any]:
    """What this rank sent since the warm-up, per image of its replica (or group) and per step."""
    sent = dict(EXCHANGE_COUNTER.bytes_sent)
    images = images_per_step * steps
    return dict(
        exchange_bytes_per_image=sum(sent.values()) / images,
        exchange_bytes_per_step=sum(sent.values()) / steps,
        exchange_wait_share=sum(EXCHANGE_COUNTER.seconds_waiting.values()) / sum(times),
        exchange_wait_share_by_name={k: v / sum(times) for k, v in EXCHANGE_COUNTER.seconds_waiting.items()},
        exchange_bytes_by_name={k: v / images for k, v in sent.items()},
    )


def hybrid_size(cfg: Config, ranks: int) -> int:
    """The hybrid variant's group: ``model.hybrid_size`` where it divides the ranks, else all of them."""
    return cfg.model.hybrid_size if ranks % cfg.model.hybrid_size == 0 else ranks


def _hybrid(rank: int, world: int, cfg: Config, num_classes: int, steps: int, warmup: int, out: Path) -> None:
    g = HybridGroups(HybridTopology(world, hybrid_size(cfg, world)), rank)
    model = _prepare(HybridAlexNet(num_classes, cfg.model.width_mult, cfg.model.dropout, cfg.model.init,
                                   group=g.hybrid_group, seed=0), cfg)
    global_batch = cfg.train.micro_batch_size * max(1, world // 2)  # the tower-parallel run's
    x, y = _batch(cfg, global_batch // world, num_classes, seed=rank)
    step = _sgd_step(model, _sgd(model, cfg), x, g.targets(y))
    times = time_steps(step, steps, warmup, bench_device(), after_warmup=EXCHANGE_COUNTER.reset)
    group_images = global_batch // world * g.topology.size
    _finish(rank, times, global_batch, out, _exchanges(times, group_images, steps))


def _ddp_torchvision(rank: int, world: int, cfg: Config, num_classes: int, steps: int, warmup: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = _prepare(torchvision_alexnet(num_classes, cfg.model.width_mult, cfg.model.dropout), cfg)
    ddp = DistributedDataParallel(model, device_ids=[bench_device()] if bench_device().type == "cuda" else None)
    global_batch = cfg.train.micro_batch_size * max(1, world // 2)  # the tower-parallel run's global batch
    x, y = _batch(cfg, global_batch // world, num_classes, seed=rank)
    times = time_steps(_sgd_step(ddp, _sgd(ddp, cfg), x, y), steps, warmup, bench_device())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _finish(rank, times, global_batch, out, dict(allreduce_bytes_per_step=grad_bytes))


def torchvision_alexnet(num_classes: int, width_mult: float = 1.0, dropout: float = 0.5) -> nn.Module:
    """torchvision's one-tower AlexNet with every convolution's kernels and every hidden
    layer's units scaled by ``width_mult`` like ours, so the baseline does comparable
    work at any width (at 1.0, torchvision's own network)."""
    import torchvision

    net = torchvision.models.alexnet(num_classes=num_classes, dropout=dropout)
    if width_mult == 1.0:
        return net

    def scaled(n: int) -> int:
        return max(1, round(n * width_mult))

    convs = [i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)]
    for i in convs:
        m = net.features[i]
        net.features[i] = nn.Conv2d(m.in_channels if i == convs[0] else scaled(m.in_channels), scaled(m.out_channels),
                                    m.kernel_size, m.stride, m.padding)
    last_conv = net.features[convs[-1]].out_channels
    linears = [i for i, m in enumerate(net.classifier) if isinstance(m, nn.Linear)]
    for i in linears:
        m = net.classifier[i]
        inputs = last_conv * POOLED * POOLED if i == linears[0] else scaled(m.in_features)
        net.classifier[i] = nn.Linear(inputs, m.out_features if i == linears[-1] else scaled(m.out_features))
    return net


def grouped_alexnet_layers(num_classes: int, width_mult: float, dropout: float) -> list[nn.Module]:
    """The paper's whole network on one device as a flat layer list (conv2, conv4 and
    conv5 with groups=2): the form a user would cut into pipeline stages."""
    convs, fc = tower_widths(width_mult)
    c1, c2, c3, c4, c5 = (2 * c for c in convs)
    fc *= 2
    return [
        nn.Conv2d(3, c1, 11, 4, 2), nn.ReLU(), LocalResponseNorm(), nn.MaxPool2d(3, 2),
        nn.Conv2d(c1, c2, 5, padding=2, groups=2), nn.ReLU(), LocalResponseNorm(), nn.MaxPool2d(3, 2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c4, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(c4, c5, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d((POOLED, POOLED)), nn.Flatten(),
        nn.Linear(c5 * POOLED * POOLED, fc), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(fc, fc), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(fc, num_classes),
    ]


def _pipeline_deepspeed(rank: int, world: int, cfg: Config, num_classes: int, steps: int, warmup: int, out: Path) -> None:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    with quiet_stdout():  # DeepSpeed's "built successfully", and every pipeline stage's layer list
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        pipe = PipelineModule(grouped_alexnet_layers(num_classes, cfg.model.width_mult, cfg.model.dropout),
                              num_stages=2, loss_fn=lambda logits, y: F.cross_entropy(logits.float(), y),
                              partition_method="parameters")
    global_batch = cfg.train.micro_batch_size * max(1, world // 2)
    micro = max(1, global_batch // PIPELINE_MICRO_BATCHES)
    ds = {"train_batch_size": micro * PIPELINE_MICRO_BATCHES, "train_micro_batch_size_per_gpu": micro,
          "steps_per_print": 10**9, "bf16": {"enabled": cfg.train.precision == "bf16"}}
    with quiet_stdout():
        engine, *_ = deepspeed.initialize(model=pipe, optimizer=_sgd(pipe, cfg), config=ds)
    x, y = _batch(cfg, micro, num_classes, seed=0)
    batches = iter(lambda: (x, y), None)  # the same micro batch, endlessly
    times = time_steps(lambda: engine.train_batch(batches), steps, warmup, bench_device())
    _finish(rank, times, micro * PIPELINE_MICRO_BATCHES, out, {})


VARIANTS = {
    "tower_parallel": _tower_parallel,
    "single_process": _tower_parallel,
    "hybrid": _hybrid,
    "ddp_torchvision": _ddp_torchvision,
    "pipeline_deepspeed": _pipeline_deepspeed,
}


def run_variant(name: str, ranks: int, cfg: Config, num_classes: int, steps: int, warmup: int) -> dict[str, Any]:
    return on_ranks(ranks, VARIANTS[name], cfg, num_classes, steps, warmup)[0]


def project_variant(ranks: int) -> str:
    """The variant that is this project's figure: one tower per rank, or both on one."""
    return "tower_parallel" if ranks > 1 else "single_process"


def _variant_names(ranks: int, baseline: bool) -> list[str]:
    names = ["tower_parallel", "single_process", "hybrid"] if ranks > 1 else ["single_process"]
    if baseline:
        names += ["ddp_torchvision"] + (["pipeline_deepspeed"] if ranks > 1 else [])
    return names


def train_flops_per_image(model: nn.Module, image_size: int) -> float:
    """Floating-point operations of one image's forward and backward (convolutions and
    matrix products, as ``torch.utils.flop_counter`` counts them), on the CPU in float32."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def matmul_peak_tflops(precision: str, size: int | None = None, repeats: int = 10) -> tuple[float, str]:
    """TFLOP/s of a large square matrix product on this device in the run's precision,
    and that precision's name: the ceiling the model's share is measured against
    (measured, not a datasheet's). fp32 on a GPU counts as TF32 when cuDNN's
    convolutions may use it (PyTorch's default)."""
    device = bench_device()
    size = size or (8192 if device.type == "cuda" else 1024)
    dtype = torch_dtype(precision)
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        times = time_steps(lambda: a @ b, repeats, 3, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return 2 * size**3 / statistics.median(times) / 1e12, "tf32" if tf32 else precision


def _flops(cfg: Config, num_classes: int) -> dict[str, float]:
    m = cfg.model
    return {
        "paper": train_flops_per_image(AlexNet(num_classes, m.width_mult, m.dropout, m.init), cfg.data.image_size),
        "torchvision": train_flops_per_image(torchvision_alexnet(num_classes, m.width_mult, m.dropout),
                                             cfg.data.image_size),
    }


def numerics_check(cfg: Config, num_classes: int, batch: int = 4) -> dict[str, float]:
    """Relative error, against float64 on the CPU with the same weights and images, of the
    logits and of the first convolution's weight gradient (the longest backward path)
    that the network gives on the bench device in the run's precision and layout."""
    m = cfg.model
    ref = AlexNet(num_classes, m.width_mult, 0.0, "kaiming", seed=0).double()  # signals that neither vanish nor cancel
    test = _prepare(copy.deepcopy(ref), cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    outputs = []
    for model, xs in ((ref, x), (test, x.to(next(test.parameters()).dtype).to(bench_device()))):
        xs = xs.contiguous(memory_format=memory_format_for(xs.device))
        logits = model(xs)
        F.cross_entropy(logits.double(), y.to(xs.device)).backward()
        outputs.append((logits.detach().double().cpu(), next(model.parameters()).grad.double().cpu()))
    names = ("logits_rel_error", "conv1_grad_rel_error")
    return {name: float((got - want).norm() / want.norm()) for name, (want, got) in zip(names, zip(*outputs))}


def _devices_used(ranks: int) -> int:
    """GPUs the ranks ran on (one each); on CPUs the peak was measured with every core."""
    return min(ranks, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _one_round(cfg: Config, ranks: int, baseline: bool, steps: int, warmup: int, num_classes: int) -> dict[str, dict]:
    variants = {}
    for name in _variant_names(ranks, baseline):
        variants[name] = run_variant(name, 1 if name == "single_process" else ranks, cfg, num_classes, steps, warmup)
    if cfg.train.exchange_chunks > 1 and ranks > 1:
        no_overlap = copy.deepcopy(cfg)
        no_overlap.train.exchange_chunks = 1
        variants["tower_parallel_no_overlap"] = run_variant("tower_parallel", ranks, no_overlap, num_classes, steps, warmup)
    return variants


def bench_model(cfg: Config, ranks: int, baseline: bool, steps: int, warmup: int, rounds: int = 1) -> dict[str, Any]:
    """Run the variants, alternated over ``rounds``, and return the contract's JSON object
    (``variants`` holds each one's median round)."""
    num_classes = cfg.model.num_classes or 1000
    runs = [_one_round(cfg, ranks, baseline, steps, warmup, num_classes) for _ in range(rounds)]
    per_variant = {name: [r[name] for r in runs] for name in runs[0]}
    variants = {name: median_round(r) for name, r in per_variant.items()}
    flops = _flops(cfg, num_classes)
    for name, v in variants.items():
        v["train_flops_per_image"] = flops["torchvision" if name == "ddp_torchvision" else "paper"]
        v["tflops"] = v["train_flops_per_image"] * v["images_per_sec"] / 1e12
    ours = variants[project_variant(ranks)]
    peak, peak_precision = matmul_peak_tflops(cfg.train.precision)
    bandwidth = copy_bandwidth_gbps(bench_device())
    result = dict(what="model", images_per_sec=ours["images_per_sec"], world_size=ranks,
                  exchange_bytes_per_image=ours["exchange_bytes_per_image"], variants=variants,
                  global_batch=cfg.train.micro_batch_size * max(1, ranks // 2), precision=cfg.train.precision,
                  tflops=ours["tflops"], matmul_peak_tflops=peak, matmul_peak_precision=peak_precision,
                  peak_fraction=ours["tflops"] / (peak * _devices_used(ranks)),
                  numerics=dict(numerics_check(cfg, num_classes), **norm_pool_errors(cfg, num_classes)),
                  copy_bandwidth_gbps=bandwidth, layers=layer_table(cfg, num_classes, steps, warmup, bandwidth))
    if baseline:
        result["baseline_images_per_sec"] = variants["ddp_torchvision"]["images_per_sec"]
        result["ratios_per_round"] = round_ratios(per_variant[project_variant(ranks)], per_variant["ddp_torchvision"])
    if "tower_parallel_no_overlap" in variants:
        overlap = round_ratios(per_variant["tower_parallel"], per_variant["tower_parallel_no_overlap"])
        result.update(overlap_ratios_per_round=overlap, overlap_on_vs_off=statistics.median(overlap))
    return result
